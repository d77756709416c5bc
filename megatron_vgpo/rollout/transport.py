"""How one bucket of TP shards reaches every rank of a model replica, for ``weight_sync.py``.

``exchange(bucket, moved, local)`` returns, on every rank of the model-parallel group (TP x PP of one
replica), the TP shards of each ``moved`` parameter of the bucket, owned by the bucket's pipeline
stage. Two implementations, picked once by ``pick_transport``:

- ``CollectiveTransport`` (NCCL, or gloo across hosts): the owning stage all-gathers each parameter
  over TP into one reused bucket buffer (rank-major, so a dim-0 partition is the full tensor already),
  then broadcasts the bucket over PP. On gloo the TP gather is one broadcast per TP rank: gloo's
  all-gather runs at 0.08 GB/s where its broadcast does 0.5-0.8 GB/s (2-core CPU machine).
- ``SharedMemoryTransport`` (gloo, every rank on one host: CPU runs and tests): for the duration of a
  sync every rank maps one ``/dev/shm`` segment; the owning stage's ranks write their shards into
  it, laid out as the collective buffer, and every rank copies the bucket out into its own buffer.
  Two memory copies instead of a trip through gloo's TCP loopback (3-10x slower than one copy,
  measured on the 2-core CPU machine).

Views returned by ``exchange`` stay valid until the next ``exchange`` or ``close`` (both transports:
vLLM's layer-wise loader keeps references to what it was given until a layer is complete, so
reading in place from memory that other ranks overwrite is not safe); ``overwritten_next(tensor)``
tells whether the next ``exchange`` overwrites a tensor.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import uuid
from typing import Protocol

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

Shards = torch.Tensor  # [rows, *shard_shape]: the TP shards of one parameter side by side, or a list


class Transport(Protocol):
    is_open: bool

    def open(self, max_bucket_bytes: int) -> None: ...
    def exchange(self, bucket, moved: list, local: dict) -> dict[str, Shards]: ...
    def overwritten_next(self, tensor: torch.Tensor) -> bool: ...
    def close(self) -> None: ...


SHM_DIR = "/dev/shm"


def pick_transport(groups, device: torch.device, max_bucket_bytes: int) -> Transport:
    """Shared memory when the group communicates over gloo, all its ranks share this host and
    ``/dev/shm`` has room for a bucket (containers often mount 64 MB there: a write past it would
    die with SIGBUS), else the collectives."""
    group = groups.mp_group
    if dist.get_world_size(group) > 1 and dist.get_backend(group) == "gloo":
        free = shutil.disk_usage(SHM_DIR).free if os.path.isdir(SHM_DIR) else 0
        hosts: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(hosts, (socket.gethostname(), free), group=group)
        if len({h for h, _ in hosts}) == 1:
            if min(f for _, f in hosts) >= max_bucket_bytes:
                return SharedMemoryTransport(groups)
            logger.warning("weight sync: %s has %d MiB free, a bucket needs %d MiB: using gloo collectives "
                           "(slower; enlarge /dev/shm, e.g. docker --shm-size, or lower "
                           "rollout.weight_sync_bucket_mb)", SHM_DIR, min(f for _, f in hosts) >> 20,
                           max_bucket_bytes >> 20)
    return CollectiveTransport(groups, device)


def layout(moved: list) -> tuple[dict[str, int], int]:
    """Byte offset of each entry of a bucket in the transport memory (64-byte aligned, so a bucket can
    mix dtypes: Megatron's local-spec norms stay float32 in a bfloat16 model), and the total bytes."""
    offsets, total = {}, 0
    for e in moved:
        offsets[e.name] = total
        total += -(-e.numel * e.dtype.itemsize // 64) * 64
    return offsets, total


def _rows(memory: torch.Tensor, offset: int, e) -> torch.Tensor:
    """Entry ``e``'s TP shards in ``memory`` (uint8) from ``offset``: ``[rows, shard numel]``."""
    return memory[offset: offset + e.numel * e.dtype.itemsize].view(e.dtype).view(e.rows, -1)


class CollectiveTransport:
    def __init__(self, groups, device: torch.device):
        self.groups, self.device, self.buffer = groups, device, None
        self.tp_ranks = dist.get_process_group_ranks(groups.tp_group) if groups.tp_size > 1 else [groups.rank]
        self.tp_by_broadcast = groups.tp_size > 1 and dist.get_backend(groups.tp_group) == "gloo"

    def open(self, max_bucket_bytes: int) -> None:
        # One buffer for every bucket: a fresh 256 MiB allocation per bucket costs page faults on CPU
        # (torch.empty(...).copy_() runs at a third of the speed of a copy into touched memory).
        self.buffer = torch.empty(max_bucket_bytes, dtype=torch.uint8, device=self.device)

    def exchange(self, bucket, moved: list, local: dict) -> dict[str, Shards]:
        g = self.groups
        offsets, total = layout(moved)
        rows = {e.name: _rows(self.buffer, offsets[e.name], e) for e in moved}
        if g.pp_rank == bucket.stage:
            with torch.no_grad():
                for e in moved:
                    shard = local[e.name].detach().reshape(-1)
                    if e.rows == 1:
                        rows[e.name][0].copy_(shard)
                    elif self.tp_by_broadcast:
                        rows[e.name][g.tp_rank].copy_(shard)
                        for r, src in enumerate(self.tp_ranks):
                            dist.broadcast(rows[e.name][r], src=src, group=g.tp_group)
                    else:
                        dist.all_gather_into_tensor(rows[e.name].view(-1), shard.contiguous(), group=g.tp_group)
        if g.pp_size > 1:
            dist.broadcast(self.buffer[:total], src=g.pp_ranks[bucket.stage], group=g.pp_group)
        return {e.name: rows[e.name].view(e.rows, *e.shard_shape) for e in moved}

    def overwritten_next(self, tensor: torch.Tensor) -> bool:
        return self.buffer is not None and tensor.untyped_storage().data_ptr() == self.buffer.data_ptr()

    @property
    def is_open(self) -> bool:
        return self.buffer is not None

    def close(self) -> None:
        self.buffer = None


class SharedMemoryTransport:
    """One ``/dev/shm`` segment per sync, mapped by every rank of the group and laid out as
    ``CollectiveTransport``'s buffer: every TP rank of the owning stage writes its own rows (so a
    dim-0 partition is again the full tensor), then every rank copies the bucket into its own reused
    buffer. From there on the semantics are exactly the collective transport's (views valid until the
    next ``exchange``), whatever a consumer holds: a second memory copy buys that, and still beats a
    trip through gloo's TCP loopback several times. Host-wide extra memory: one bucket in the
    segment, plus the per-rank buffers."""

    def __init__(self, groups):
        self.groups, self.segment, self.buffer = groups, None, None
        self.owner = dist.get_process_group_ranks(groups.mp_group)[0]  # creates the segment

    def open(self, max_bucket_bytes: int) -> None:
        g, group = self.groups, self.groups.mp_group
        path = [f"/dev/shm/megatron_vgpo_sync_{uuid.uuid4().hex}" if g.rank == self.owner else None]
        dist.broadcast_object_list(path, src=self.owner, group=group)
        if g.rank == self.owner:  # creates the file
            self.segment = torch.from_file(path[0], shared=True, size=max_bucket_bytes, dtype=torch.uint8)
        dist.barrier(group=group)
        if g.rank != self.owner:
            self.segment = torch.from_file(path[0], shared=True, size=max_bucket_bytes, dtype=torch.uint8)
        dist.barrier(group=group)
        if g.rank == self.owner:
            os.unlink(path[0])  # mapped everywhere: the memory lives until the last rank unmaps it
        self.buffer = torch.empty(max_bucket_bytes, dtype=torch.uint8)

    def exchange(self, bucket, moved: list, local: dict) -> dict[str, Shards]:
        g, group = self.groups, self.groups.mp_group
        offsets, total = layout(moved)
        dist.barrier(group=group)  # everyone has copied the previous bucket out of the segment
        if g.pp_rank == bucket.stage:
            with torch.no_grad():
                for e in moved:
                    if e.rows > 1 or g.tp_rank == 0:
                        _rows(self.segment, offsets[e.name], e)[g.tp_rank if e.rows > 1 else 0].copy_(
                            local[e.name].detach().reshape(-1))
        dist.barrier(group=group)  # every row is written
        self.buffer[:total].copy_(self.segment[:total])
        return {e.name: _rows(self.buffer, offsets[e.name], e).view(e.rows, *e.shard_shape) for e in moved}

    def overwritten_next(self, tensor: torch.Tensor) -> bool:
        return self.buffer is not None and tensor.untyped_storage().data_ptr() == self.buffer.data_ptr()

    @property
    def is_open(self) -> bool:
        return self.segment is not None

    def close(self) -> None:
        if self.segment is not None:
            dist.barrier(group=self.groups.mp_group)  # nobody reads the segment any more
        self.segment = self.buffer = None
