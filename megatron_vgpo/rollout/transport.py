"""How one bucket of TP shards reaches every rank of a model replica as full tensors, for ``weight_sync.py``.

``exchange(bucket, moved, local)`` returns, on every rank of the model-parallel group (TP x PP of one
replica), the FULL (TP=1) Megatron tensor of each ``moved`` parameter of the bucket, owned by the
bucket's pipeline stage: ``{name: tensor of e.full_shape}``. Two implementations, picked once by
``pick_transport``:

- ``CollectiveTransport`` (NCCL, or gloo across hosts): the owning stage all-gathers each parameter
  over TP into one reused bucket buffer, rank-major (``[rows, *shard_shape]``), then broadcasts the
  bucket over PP; a parameter becomes its full tensor when it is looked up (a view for a dim-0,
  stride-1 partition, ``name_mapping.unshard``'s copy otherwise). On gloo the TP gather is one
  broadcast per TP rank: gloo's all-gather runs at 0.08 GB/s where its broadcast does 0.5-0.8 GB/s
  (2-core CPU machine). Per rank: one bucket buffer plus one unsharded parameter.
- ``SharedMemoryTransport`` (gloo, every rank on one host: CPU runs and tests): for the duration of a
  sync every rank maps one ``/dev/shm`` file holding two segments; buckets alternate between them.
  The owning stage's TP ranks write their shards straight into the full tensors' layout there
  (``name_mapping.write_shard``), and every rank reads the full tensors in place: one memory copy per shard, no
  concatenation, no per-rank buffer, instead of a trip through gloo's TCP loopback (3-10x slower than
  the copy, measured on the 2-core CPU machine). Host-wide: two buckets of shared memory.

The shard-to-shard path (rollout TP = trainer TP, see ``weight_sync.py``) has its own
``ShardTransport``: no TP gather, only this rank's pieces of the bucket, broadcast over the PP group
by the owning stage's rank with the same TP rank.

Every transport counts what this rank sends and receives through it (``traffic``, per sync; logical
bytes: a broadcast root sends the bucket once to each of its peers, a shared-memory write is sent,
what a rank reads that others wrote is received).

Validity of the returned tensors (``overwritten_next(tensor)`` says whether the next ``exchange``
overwrites one): ``CollectiveTransport``'s views stay valid until the next ``exchange``;
``SharedMemoryTransport``'s until two more buckets have been exchanged (the barrier before bucket
k+2 is written into bucket k's segment waits for every rank to have asked for bucket k+2, by which
time a consumer of the ``weight_sync`` stream holds at most bucket k+1's last tensor). ``close`` ends
the writing: whatever a rank still holds stays intact.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm

logger = logging.getLogger(__name__)


@dataclass
class Traffic:
    """Bytes this rank sent and received through a transport during one sync."""

    sent: int = 0
    received: int = 0


class Transport(Protocol):
    is_open: bool
    traffic: Traffic

    def open(self, bucket_bytes: list[int]) -> None:
        """Allocate the transport memory for a sync whose buckets move these bytes (``layout``), in order."""

    def exchange(self, bucket, moved: list, local: dict) -> Mapping[str, torch.Tensor]:
        """The full Megatron tensor of every ``moved`` entry, on every rank. Collective."""

    def overwritten_next(self, tensor: torch.Tensor) -> bool:
        """Whether the next ``exchange`` overwrites ``tensor`` (a view of the transport memory)."""

    def close(self) -> None: ...


SHM_DIR = "/dev/shm"


def pick_transport(groups, device: torch.device, bucket_bytes: list[int]) -> Transport:
    """Shared memory when the group communicates over gloo, all its ranks share this host and
    ``/dev/shm`` has room for its two segments (containers often mount 64 MB there: a write past it
    would die with SIGBUS), else the collectives."""
    group = groups.mp_group
    if dist.get_world_size(group) > 1 and dist.get_backend(group) == "gloo":
        free = shutil.disk_usage(SHM_DIR).free if os.path.isdir(SHM_DIR) else 0
        hosts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(hosts, (socket.gethostname(), free), group=group)
        if len({h for h, _ in hosts}) == 1:
            need = sum(SharedMemoryTransport.segment_bytes(bucket_bytes))
            if min(f for _, f in hosts) >= need:
                return SharedMemoryTransport(groups)
            logger.warning("weight sync: %s has %d MiB free, two buckets need %d MiB: using gloo collectives "
                           "(slower; enlarge /dev/shm, e.g. docker --shm-size, or lower "
                           "rollout.weight_sync_bucket_mb)", SHM_DIR, min(f for _, f in hosts) >> 20, need >> 20)
    return CollectiveTransport(groups, device)


def layout(moved: list) -> tuple[dict[str, int], int]:
    """Byte offset of each entry of a bucket in the transport memory (64-byte aligned, so a bucket can
    mix dtypes: Megatron's local-spec norms stay float32 in a bfloat16 model), and the total bytes."""
    offsets, total = {}, 0
    for e in moved:
        offsets[e.name] = total
        total += -(-e.numel * e.dtype.itemsize // 64) * 64
    return offsets, total


def _view(memory: torch.Tensor, offset: int, e, shape: tuple[int, ...]) -> torch.Tensor:
    """Entry ``e``'s bytes in ``memory`` (uint8) from ``offset``, as ``shape`` (``e.numel`` elements)."""
    return memory[offset: offset + e.numel * e.dtype.itemsize].view(e.dtype).view(shape)


def _nbytes(entries) -> int:
    return sum(e.numel * e.dtype.itemsize for e in entries)


def _gather_tp(groups, tp_ranks: list[int], by_broadcast: bool, rows: torch.Tensor, shard: torch.Tensor) -> None:
    """Every TP rank's ``shard`` into ``rows`` (``[tp, shard.numel()]``, rank-major). On gloo one
    broadcast per TP rank: gloo's all-gather is several times slower than its broadcast."""
    if by_broadcast:
        rows[groups.tp_rank].copy_(shard.reshape(-1))
        for r, src in enumerate(tp_ranks):
            dist.broadcast(rows[r], src=src, group=groups.tp_group)
    else:
        dist.all_gather_into_tensor(rows.view(-1), shard.reshape(-1).contiguous(), group=groups.tp_group)


# ---- collectives ---------------------------------------------------------------------------------

class _Unsharded(Mapping):
    """``{name: full tensor}`` over rank-major gathered shards, each built when looked up (so a rank
    holds at most one unsharded copy at a time, whatever the bucket size)."""

    def __init__(self, moved: list, shards: dict[str, torch.Tensor]):
        self.entries, self.shards = {e.name: e for e in moved}, shards  # shards: [rows, *shard_shape]

    def __getitem__(self, name: str) -> torch.Tensor:
        e, shards = self.entries[name], self.shards[name]
        if e.rows == 1:
            return shards[0]
        if nm.tp_partition(name) == (0, 1):  # side by side already: the full tensor
            return shards.view(e.full_shape)
        return nm.unshard(name, list(shards))

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


class _OneBuffer:
    """The lifecycle of a transport that moves every bucket through one reused device buffer
    (``self.buffer``, None when closed): a tensor viewing it is overwritten by the next bucket."""

    buffer: Optional[torch.Tensor] = None

    def overwritten_next(self, tensor: torch.Tensor) -> bool:
        return self.buffer is not None and tensor.untyped_storage().data_ptr() == self.buffer.data_ptr()

    @property
    def is_open(self) -> bool:
        return self.buffer is not None

    def close(self) -> None:
        self.buffer = None


class CollectiveTransport(_OneBuffer):
    def __init__(self, groups, device: torch.device):
        self.groups, self.device, self.buffer, self.traffic = groups, device, None, Traffic()
        self.tp_ranks = dist.get_process_group_ranks(groups.tp_group) if groups.tp_size > 1 else [groups.rank]
        self.tp_by_broadcast = groups.tp_size > 1 and dist.get_backend(groups.tp_group) == "gloo"

    def open(self, bucket_bytes: list[int]) -> None:
        # One buffer for every bucket: a fresh 256 MiB allocation per bucket costs page faults on CPU
        # (torch.empty(...).copy_() runs at a third of the speed of a copy into touched memory).
        self.buffer = torch.empty(max(bucket_bytes), dtype=torch.uint8, device=self.device)
        self.traffic = Traffic()

    def exchange(self, bucket, moved: list, local: dict) -> Mapping[str, torch.Tensor]:
        g = self.groups
        offsets, total = layout(moved)
        rows = {e.name: _view(self.buffer, offsets[e.name], e, (e.rows, -1)) for e in moved}
        if g.pp_rank == bucket.stage:
            with torch.no_grad():
                for e in moved:
                    shard = local[e.name].detach()
                    if e.rows == 1:
                        rows[e.name][0].copy_(shard.reshape(-1))
                    else:
                        _gather_tp(g, self.tp_ranks, self.tp_by_broadcast, rows[e.name], shard)
                        peers_bytes = (e.rows - 1) * e.numel // e.rows * e.dtype.itemsize
                        self.traffic.sent += peers_bytes  # this shard to each TP peer
                        self.traffic.received += peers_bytes
        if g.pp_size > 1:
            dist.broadcast(self.buffer[:total], src=g.pp_ranks[bucket.stage], group=g.pp_group)
            if g.pp_rank == bucket.stage:
                self.traffic.sent += (g.pp_size - 1) * _nbytes(moved)
            else:
                self.traffic.received += _nbytes(moved)
        return _Unsharded(moved, {e.name: rows[e.name].view(e.rows, *e.shard_shape) for e in moved})


# ---- shared memory -------------------------------------------------------------------------------

class SharedMemoryTransport:
    """Two segments of one ``/dev/shm`` file, mapped by every rank of the group; the exchanged buckets
    alternate between them (even ones in the first, odd ones in the second). Each bucket is laid out
    as full tensors (``layout``): every TP rank of the owning stage writes its own shard of each
    partitioned parameter to its place (``name_mapping.write_shard``), and the stage's TP ranks share the writing
    of the replicated ones. See the module docstring for how long the tensors stay valid."""

    def __init__(self, groups):
        self.groups, self.segments, self.exchanges, self.traffic = groups, (), 0, Traffic()
        self.creator = dist.get_process_group_ranks(groups.mp_group)[0]

    @staticmethod
    def segment_bytes(bucket_bytes: list[int]) -> tuple[int, int]:
        """Bytes of the two segments: the largest even and odd exchanged bucket (a bucket moving
        nothing is not exchanged)."""
        exchanged = [b for b in bucket_bytes if b]
        return max(exchanged[0::2], default=0), max(exchanged[1::2], default=0)

    def open(self, bucket_bytes: list[int]) -> None:
        even, odd = self.segment_bytes(bucket_bytes)
        memory = self._map(even + odd)
        self.segments, self.exchanges, self.traffic = (memory[:even], memory[even:]), 0, Traffic()

    def _map(self, nbytes: int) -> torch.Tensor:
        """A fresh ``/dev/shm`` file of ``nbytes``, mapped by every rank of the group (uint8).

        Its pages are first touched here, each rank its share: that first touch (tmpfs allocation)
        is the dearest part of a sync on the 2-core CPU VM (0.3 GB/s, measured), and left to the
        writers of the first two buckets it falls on one rank when the owning stage has one (TP = 1).
        Every page is written by some bucket anyway."""
        g, group = self.groups, self.groups.mp_group
        path: list[Optional[str]] = [f"{SHM_DIR}/megatron_vgpo_sync_{uuid.uuid4().hex}" if g.rank == self.creator
                                     else None]
        dist.broadcast_object_list(path, src=self.creator, group=group)
        if g.rank == self.creator:  # creates the file
            memory = torch.from_file(path[0], shared=True, size=nbytes, dtype=torch.uint8)
        dist.barrier(group=group)
        if g.rank != self.creator:
            memory = torch.from_file(path[0], shared=True, size=nbytes, dtype=torch.uint8)
        share = -(-nbytes // dist.get_world_size(group) // 4096) * 4096  # whole pages
        start = min(dist.get_rank(group) * share, nbytes)
        memory[start: start + share].zero_()
        dist.barrier(group=group)
        if g.rank == self.creator:
            os.unlink(path[0])  # mapped everywhere: the memory lives until the last rank unmaps it
        return memory

    def exchange(self, bucket, moved: list, local: dict) -> Mapping[str, torch.Tensor]:
        g, group = self.groups, self.groups.mp_group
        offsets, _ = layout(moved)
        segment = self.segments[self.exchanges % 2]
        full = {e.name: _view(segment, offsets[e.name], e, e.full_shape) for e in moved}
        if self.exchanges >= 2:
            dist.barrier(group=group)  # every rank is done with the bucket before last (same segment)
        self.exchanges += 1
        written = self._write(moved, full, local) if g.pp_rank == bucket.stage else 0
        dist.barrier(group=group)  # every shard is written
        self.traffic.sent += written
        self.traffic.received += _nbytes(moved) - written  # read in place, written by the others
        return full

    def _write(self, moved: list, full: dict[str, torch.Tensor], local: dict) -> int:
        """This rank's part of the bucket: its shard of each partitioned parameter, and the replicated
        parameters ``_writers`` gives it. Returns the bytes written."""
        g = self.groups
        writers, written = _writers(moved, g.tp_size), 0
        with torch.no_grad():
            for e in moved:
                shard = local[e.name].detach()
                if e.rows > 1:
                    nm.write_shard(e.name, full[e.name], shard, g.tp_rank, e.rows)
                elif writers[e.name] == g.tp_rank:
                    full[e.name].copy_(shard)
                else:
                    continue
                written += shard.numel() * shard.element_size()
        return written

    def overwritten_next(self, tensor: torch.Tensor) -> bool:
        return False  # the next bucket goes to the other segment

    @property
    def is_open(self) -> bool:
        return bool(self.segments)

    def close(self) -> None:
        # No barrier: nothing is written after the last exchange, and a mapping lives as long as a
        # view of it does, so whatever a rank still holds stays intact.
        self.segments = ()


# ---- shard to shard ------------------------------------------------------------------------------

class ShardTransport(_OneBuffer):
    """The shard-to-shard path's transport (rollout TP = trainer TP, ``weight_sync.py``): a rank of a
    stage that does not own the bucket receives its own pieces of it (``pieces``: what its engine TP
    rank loads) from the owning stage's rank with the same TP rank, a member of its pipeline group:
    a broadcast over the PP group, since every other stage needs the same pieces. One reused buffer
    of the largest bucket's pieces; the views returned stay valid until the next ``exchange``.

    ``gather`` is the one TP collective: the full tensor of a parameter whose Megatron shards do not
    line up with the engine's (the vocabulary, when Megatron's padding differs from vLLM's)."""

    def __init__(self, groups, device: torch.device):
        self.groups, self.device, self.buffer, self.traffic = groups, device, None, Traffic()
        self.tp_ranks = dist.get_process_group_ranks(groups.tp_group) if groups.tp_size > 1 else [groups.rank]
        self.tp_by_broadcast = groups.tp_size > 1 and dist.get_backend(groups.tp_group) == "gloo"

    def open(self, bucket_bytes: list[int]) -> None:
        self.buffer = torch.empty(max(bucket_bytes, default=0), dtype=torch.uint8, device=self.device)
        self.traffic = Traffic()

    def exchange(self, stage: int, pieces: list, tensors: Optional[list[torch.Tensor]]) -> list[torch.Tensor]:
        """This rank's ``pieces`` of a bucket of pipeline stage ``stage`` (objects with ``name``,
        ``shape``, ``numel`` and ``dtype``): ``tensors`` on that stage (returned as they are), views
        of the received bytes elsewhere. Collective over the PP group."""
        g = self.groups
        offsets, total = layout(pieces)
        views = [_view(self.buffer, offsets[p.name], p, p.shape) for p in pieces]
        if g.pp_rank == stage:
            with torch.no_grad():
                for view, tensor in zip(views, tensors):
                    view.copy_(tensor)
            self.traffic.sent += (g.pp_size - 1) * _nbytes(pieces)
        else:
            self.traffic.received += _nbytes(pieces)
        dist.broadcast(self.buffer[:total], src=g.pp_ranks[stage], group=g.pp_group)
        return tensors if g.pp_rank == stage else views

    def gather(self, name: str, shard: torch.Tensor) -> torch.Tensor:
        """The full Megatron tensor of a TP-partitioned parameter, from every TP rank's ``shard``."""
        g = self.groups
        rows = shard.new_empty(g.tp_size, shard.numel())
        with torch.no_grad():
            _gather_tp(g, self.tp_ranks, self.tp_by_broadcast, rows, shard.detach())
        nbytes = (g.tp_size - 1) * shard.numel() * shard.element_size()
        self.traffic.sent += nbytes
        self.traffic.received += nbytes
        return nm.unshard(name, list(rows.view(g.tp_size, *shard.shape)))


def _writers(moved: list, tp_size: int) -> dict[str, int]:
    """The TP rank that writes each replicated (``rows == 1``) entry: every rank of the stage holds it,
    so the bytes are shared out, largest first to the least loaded rank (the same on every rank)."""
    load, writers = [0] * tp_size, {}
    for e in sorted((e for e in moved if e.rows == 1), key=lambda e: -e.numel * e.dtype.itemsize):
        rank = load.index(min(load))
        writers[e.name], load[rank] = rank, load[rank] + e.numel * e.dtype.itemsize
    return writers
