"""Megatron -> vLLM weight resharding: this rank's TP/PP shards -> the HF-named tensors the engine
loads, streamed in size-bounded buckets, in memory.

    sync = WeightResharder(chunks, groups, bucket_bytes=cfg.rollout.weight_sync_bucket_mb << 20,
                           rollout_tp=cfg.rollout.tensor_model_parallel_size)
    engine.update_weights(sync.engine_weights())     # every rank, after every optimizer step

Two paths, picked once at construction (and logged):

- full tensors (``hf_weights``), the general path: every rank receives every full HF tensor and its
  vLLM shard takes what it needs, whatever the rollout TP;
- shard to shard (``engine_weights`` when the rollout TP equals the trainer's): each rank receives
  only what its own engine TP rank loads, from the stage that owns it; see "Shard to shard" below.

``engine_weights`` is the full path when the TPs differ (or ``rollout_tp`` is not given).

Full tensors. Per bucket (consecutive parameters of one pipeline stage, at most ``bucket_bytes``
once gathered, never splitting a module's weight from its bias, so that vLLM's layer-wise loader
finishes each layer inside one bucket; both paths share the buckets):

1. the bucket's parameters reach every rank of the model replica (TP x PP) as full Megatron tensors
   (``transport.py``): NCCL all-gather over TP, a broadcast over PP, then ``name_mapping.unshard``
   (a view for a dim-0, stride-1 partition); or, when all ranks share a host (CPU, gloo), shared
   memory that the owning TP ranks write their shards into at their place in the full tensors, read
   in place by every rank. Data-parallel replicas sync independently, in parallel;
2. each full tensor is converted with ``name_mapping.megatron_to_hf`` (q/k/v and gate/up split,
   vocabulary padding dropped, tied output layer dropped), then yielded.

The generator drives collectives: all ranks must consume it to the end, in step. A yielded tensor may
be a view of transport memory that a later bucket overwrites (see ``hf_weights``). Extra memory,
whatever the model size, allocated once per sync: with the collectives, per rank, one bucket buffer
plus one full parameter (the un-sharded copy of a partition); with shared memory, host-wide, two
buckets mapped by every rank of the replica and no private buffer. Either way, per rank, the q/k/v
split of one fused parameter. Without communication (TP = PP = 1, or a replicated parameter with
PP = 1) the parameters themselves are yielded, without any copy.

Shard to shard. vLLM groups consecutive ranks into its TP groups and Megatron's rank order puts TP
ranks innermost, so with equal TPs the engine's TP rank r is the trainer's TP rank r, and what engine
rank r loads of each HF tensor (``vllm_region``) is what trainer rank r holds of the Megatron one:
a ``linear_qkv`` shard is whole query groups (Megatron requires TP | kv groups), i.e. the query heads
and kv heads vLLM gives rank r, ``linear_fc1``'s stride-2 shard is ``[gate_r; up_r]``, the
row-parallel ``linear_proj`` / ``linear_fc2`` split dim 1 alike, and the vocabulary rows match when
both paddings give the same rows per rank (Megatron pads to a multiple of TP, vLLM to 64: the
released vocabularies; else that tensor is gathered over TP on its stage). Replicated parameters
(norms, and the vision tower, which vLLM shards but Megatron does not) are sliced to rank r's part
by their owner. Per bucket, ranks of the owning stage cut their pieces locally, the others receive
theirs from the owning stage's rank with the same TP rank, a member of their PP group
(``transport.ShardTransport``): no TP gather, and a rank receives about 1/TP of the other stages'
parameters instead of all of them.

vLLM's loader takes full HF tensors and narrows each to its rank's region, so a piece is handed to it
inside a full-shaped "carrier" tensor: one reused buffer laid out as the bucket's full tensors, in
which only this rank's regions are written (the rest is never read: the narrowing is a view). This
is vLLM's ordinary ``reload_weights`` path, post-load processing (CPU repacking) included; only the
bytes moved change. A whole-tensor piece (a norm) is yielded as it is. Memory, per rank: one bucket
of carriers, one bucket of pieces; views stay valid until the next bucket (a bucket's last tensor is
copied, as on the full path).

Both paths count the bytes this rank sends and receives (``traffic``, per sync).

The plan (which stage holds what, bucket boundaries) is exchanged once, at construction.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm
from megatron_vgpo.models.qwen2_5_vl.loading import global_parameter_names
from megatron_vgpo.rollout.transport import Traffic, layout, pick_transport

logger = logging.getLogger(__name__)

Named = tuple[str, torch.Tensor]


@dataclass(frozen=True)
class _Entry:
    """One Megatron parameter of the model: where it lives and how it is sharded."""

    name: str  # global mapping name (language_model.decoder.layers.{global i}..., vision.*)
    shard_shape: tuple[int, ...]
    dtype: torch.dtype
    stage: int  # pipeline rank holding it
    rows: int  # TP shards to gather (1: replicated, or TP = 1)

    @property
    def numel(self) -> int:
        return self.rows * math.prod(self.shard_shape)

    @property
    def full_shape(self) -> tuple[int, ...]:
        """The TP=1 shape: ``shard_shape`` with the partition dim ``rows`` times longer."""
        if self.rows == 1:
            return self.shard_shape
        dim = nm.tp_partition(self.name)[0]
        return self.shard_shape[:dim] + (self.rows * self.shard_shape[dim],) + self.shard_shape[dim + 1:]

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class _Bucket:
    stage: int
    entries: tuple[_Entry, ...]


class WeightResharder:
    """Streams this model's weights as HF-named tensors; see the module docstring.

    Args:
        chunks: this rank's model chunks (``build_policy``), any number (virtual pipeline).
        groups: the trainer's ``ParallelGroups``.
        bucket_bytes: bucket size limit (gathered, full bytes); a module larger than it travels alone.
        rollout_tp: the engine's TP size (``rollout.tensor_model_parallel_size``); equal to the
            trainer's, ``engine_weights`` goes shard to shard. None: the full-tensor path.
    """

    def __init__(self, chunks: list, groups, bucket_bytes: int, rollout_tp: Optional[int] = None):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.arch, self.groups, self.bucket_bytes = chunks[0].arch, groups, bucket_bytes
        self.local = {name: param for chunk in chunks for name, param in global_parameter_names(chunk)
                      if not (self.arch.tie_embeddings and name == nm.OUTPUT)}  # tied: HF has no lm_head
        self.buckets = self._plan()
        self.moved_bytes = [layout(self._moved(b))[1] for b in self.buckets]  # per bucket, through the transport
        device = next(iter(self.local.values())).device
        self.transport = pick_transport(groups, device, self.moved_bytes)
        self.traffic = Traffic()  # bytes this rank sent and received through the transport, last sync
        if rollout_tp == groups.tp_size and groups.rank % groups.tp_size != groups.tp_rank:
            # The shard-to-shard premise: vLLM's TP rank (rank % rollout TP) is the trainer's.
            raise ValueError(f"rank {groups.rank} has trainer TP rank {groups.tp_rank}, vLLM's would be "
                             f"{groups.rank % groups.tp_size}: TP ranks must be adjacent (Megatron's order)")
        from megatron_vgpo.rollout.shard_sync import ShardSync

        self.shards = ShardSync(self, device) if rollout_tp == groups.tp_size else None
        self._log_path(rollout_tp)

    def _log_path(self, rollout_tp: Optional[int]) -> None:
        g = self.groups
        if self.shards is not None:
            logger.info("weight sync: shard to shard (rollout TP %d = trainer TP %d): this rank receives %.3f GB "
                        "per sync from the other pipeline stages", rollout_tp, g.tp_size, self.shards.received / 1e9)
        else:
            why = "rollout TP not given" if rollout_tp is None else f"rollout TP {rollout_tp} != trainer TP {g.tp_size}"
            logger.info("weight sync: full tensors to every rank (%s): %.3f GB of HF tensors per rank per sync",
                        why, self.total_bytes / 1e9)

    # ---- plan ---------------------------------------------------------------------------------

    def _plan(self) -> list[_Bucket]:
        g = self.groups
        mine = [(name, tuple(p.shape), p.dtype) for name, p in self.local.items()]
        stages = [mine]
        if g.pp_size > 1:
            stages = [None] * g.pp_size
            dist.all_gather_object(stages, mine, group=g.pp_group)
        entries = []
        for stage, params in enumerate(stages):
            for name, shape, dtype in params:
                partitioned = g.tp_size > 1 and nm.tp_partition(name)[0] is not None
                entries.append(_Entry(name, shape, dtype, stage, g.tp_size if partitioned else 1))
        return self._bucketed(entries)

    def _bucketed(self, entries: list[_Entry]) -> list[_Bucket]:
        """Consecutive whole modules (weight + bias) of one stage, up to the size limit."""
        modules: list[list[_Entry]] = []
        for e in entries:
            if modules and modules[-1][0].module == e.module and modules[-1][0].stage == e.stage:
                modules[-1].append(e)
            else:
                modules.append([e])
        groups, current = [], []
        for module in modules:
            fits = (current and current[0][0].stage == module[0].stage
                    and sum(_nbytes(m) for m in current) + _nbytes(module) <= self.bucket_bytes)
            if current and not fits:
                groups.append(current)
                current = []
            current.append(module)
        if current:
            groups.append(current)
        # The smallest module goes last: the last tensor of a bucket is copied when the next bucket
        # overwrites it (collective transport and carriers, see _last_kept), and a norm is cheaper to copy.
        return [_Bucket(g[0][0].stage, tuple(e for m in sorted(g, key=lambda m: -_nbytes(m)) for e in m))
                for g in groups]

    def _moved(self, bucket: _Bucket) -> list[_Entry]:
        """Entries that must travel: all of them across pipeline stages, else only TP-partitioned ones."""
        return [e for e in bucket.entries if self.groups.pp_size > 1 or e.rows > 1]

    @property
    def total_bytes(self) -> int:
        """Bytes of full Megatron tensors streamed per sync (padding rows included)."""
        return sum(_nbytes(b.entries) for b in self.buckets)

    # ---- streaming ----------------------------------------------------------------------------

    def hf_weights(self) -> Iterator[Named]:
        """Every HF tensor of the model, full and unsharded, bucket by bucket. Collective.

        Tensors may be views of transport memory that a later bucket overwrites: the next one (collective
        transport) or the one after (shared memory: a tensor stays valid until two more buckets have
        been exchanged). A consumer must copy what it keeps longer (vLLM's loader consumes a module's
        tensors as soon as they all arrived, and a bucket never splits a module; the engine adapter
        copies the vocabulary-padded ones it holds until the end). Holding the current tensor while
        asking for the next is always safe: a bucket's last tensor is copied when the next bucket
        would overwrite it.
        """
        with self._session():
            for bucket in self.buckets:
                yield from self._bucket_tensors(bucket)

    def megatron_weights(self) -> Iterator[Named]:
        """The full (TP=1) Megatron tensors under global names, before the HF conversion. Collective.
        Views of transport memory stay valid until the next bucket (collective transport; the last
        one of a bucket included, unlike ``hf_weights``) or until two more buckets (shared memory)."""
        with self._session():
            for bucket in self.buckets:
                yield from self._full_tensors(bucket)

    def engine_weights(self) -> Iterator[Named]:
        """What this rank's engine loads, for ``RolloutEngine.update_weights``. Collective.

        Shard to shard (rollout TP = trainer TP): full-shaped HF tensors in which only the region this
        rank's engine TP rank loads is written (``vllm_region``; the rest is garbage, never read by
        vLLM's loader), whole tensors where it loads all of it; valid until the next bucket (the last
        tensor of a bucket is copied). Otherwise ``hf_weights``. Not for anything but the engine.
        """
        if self.shards is None:
            yield from self.hf_weights()
        else:
            yield from self.shards.stream()

    @contextmanager
    def _session(self):
        if max(self.moved_bytes, default=0) == 0:  # TP = PP = 1: nothing travels
            self.traffic = Traffic()
            yield
            return
        self.transport.open(self.moved_bytes)
        try:
            yield
        finally:
            self.traffic = self.transport.traffic
            self.transport.close()

    def _bucket_tensors(self, bucket: _Bucket) -> Iterator[Named]:
        items = (hf for name, full in self._full_tensors(bucket) for hf in nm.megatron_to_hf([(name, full)], self.arch))
        yield from _last_kept(items, self.transport.overwritten_next)

    def _full_tensors(self, bucket: _Bucket) -> Iterator[Named]:
        moved = self._moved(bucket)
        full = self.transport.exchange(bucket, moved, self.local) if moved else {}
        for e in bucket.entries:
            if e.name in full:
                yield e.name, full[e.name]
            else:  # nothing to communicate: the parameter itself
                yield e.name, self.local[e.name].detach()


def _nbytes(entries) -> int:
    return sum(e.numel * e.dtype.itemsize for e in entries)


def _last_kept(items: Iterator[Named], overwritten_next) -> Iterator[Named]:
    """``items``, the last one copied if the next bucket would overwrite it: a consumer holds the
    tensor it got while asking for the next one (collective transports and carriers reuse one buffer;
    shared memory writes the next bucket elsewhere)."""
    previous = next(items, None)
    for item in items:
        yield previous
        previous = item
    if previous is None:
        return
    name, tensor = previous
    if overwritten_next(tensor):
        tensor = tensor.clone()
    previous = item = items = None
    yield name, tensor


def hf_state_dict_of(chunks: list, groups, bucket_bytes: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The whole model as HF tensors on every rank (tests and tools; a full copy, unlike streaming)."""
    sync = WeightResharder(chunks, groups, bucket_bytes or 1 << 62)
    return {name: t.clone() for name, t in sync.hf_weights()}
