"""Megatron -> vLLM weight resharding: this rank's TP/PP shards -> the full HF-named tensors the engine
loads, streamed in size-bounded buckets, in memory.

    sync = WeightResharder(chunks, groups, bucket_bytes=cfg.rollout.weight_sync_bucket_mb << 20)
    engine.update_weights(sync.hf_weights())        # every rank, after every optimizer step

Every rank of the world runs this, and every rank receives every HF tensor (its vLLM shard takes
what it needs; the rollout TP need not match the trainer's). Per bucket (consecutive parameters of
one pipeline stage, at most ``bucket_bytes`` once gathered, never splitting a module's weight from
its bias, so that vLLM's layer-wise loader finishes each layer inside one bucket):

1. on the owning stage, each TP-partitioned parameter is all-gathered over the trainer's TP group
   into its slot of the bucket (on gloo: one broadcast per TP rank, see ``_gather_tp``); replicated
   ones (norms, the vision tower) are copied;
2. with PP > 1, the bucket is broadcast from the owning stage to the other stages of the pipeline
   (each TP rank's pipeline group in parallel; data-parallel replicas sync independently);
3. each slot is turned into the full Megatron tensor (``name_mapping.unshard``; a dim-0, stride-1
   partition already is the full tensor, so it is a view) and converted with
   ``name_mapping.megatron_to_hf`` (q/k/v and gate/up split, vocabulary padding dropped, tied output
   layer dropped), then yielded.

The generator drives collectives: all ranks must consume it to the end, in step. Extra memory per
rank: one bucket buffer (allocated once per sync and reused by every bucket) plus one full parameter
(the un-sharded copy of a dim-1 / stride-2 partition, or the q/k/v split of a fused one), whatever
the model size. Without communication (TP = PP = 1, or a replicated parameter with PP = 1) the
parameters themselves are yielded, without any copy.

The plan (which stage holds what, bucket boundaries) is exchanged once, at construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm
from megatron_vgpo.models.qwen2_5_vl.loading import global_parameter_names

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
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class _Bucket:
    stage: int
    entries: tuple[_Entry, ...]

    @property
    def numel(self) -> int:
        return sum(e.numel for e in self.entries)


class WeightResharder:
    """Streams this model's weights as full HF-named tensors; see the module docstring.

    Args:
        chunks: this rank's model chunks (``build_policy``), any number (virtual pipeline).
        groups: the trainer's ``ParallelGroups``.
        bucket_bytes: bucket size limit (gathered, full bytes); a parameter larger than it travels
            alone.
    """

    def __init__(self, chunks: list, groups, bucket_bytes: int):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.arch, self.groups, self.bucket_bytes = chunks[0].arch, groups, bucket_bytes
        self.local = {name: param for chunk in chunks for name, param in global_parameter_names(chunk)
                      if not (self.arch.tie_embeddings and name == nm.OUTPUT)}  # tied: HF has no lm_head
        self.device = next(iter(self.local.values())).device
        self._buffer: Optional[torch.Tensor] = None  # reused by every bucket of one sync
        if groups.tp_size > 1:
            self._tp_ranks = dist.get_process_group_ranks(groups.tp_group)
            self._tp_gather_by_broadcast = dist.get_backend(groups.tp_group) == "gloo"
        self.buckets = self._plan()

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
        limit = self.bucket_bytes
        buckets, current = [], []

        def size(es):
            return sum(e.numel * e.dtype.itemsize for e in es)

        # Whole modules (weight + bias) stay in one bucket.
        modules: list[list[_Entry]] = []
        for e in entries:
            if modules and modules[-1][0].module == e.module and modules[-1][0].stage == e.stage:
                modules[-1].append(e)
            else:
                modules.append([e])
        for module in modules:
            fits = (current and current[0].stage == module[0].stage and current[0].dtype == module[0].dtype
                    and all(e.dtype == current[0].dtype for e in module) and size(current) + size(module) <= limit)
            if current and not fits:
                buckets.append(_Bucket(current[0].stage, tuple(current)))
                current = []
            current += module
        if current:
            buckets.append(_Bucket(current[0].stage, tuple(current)))
        return buckets

    @property
    def total_bytes(self) -> int:
        """Bytes of full Megatron tensors streamed per sync (padding rows included)."""
        return sum(e.numel * e.dtype.itemsize for b in self.buckets for e in b.entries)

    # ---- streaming ----------------------------------------------------------------------------

    def hf_weights(self) -> Iterator[Named]:
        """Every HF tensor of the model, full and unsharded, bucket by bucket. Collective.

        Tensors may be views of a buffer that the next bucket overwrites: a consumer must copy what
        it keeps (vLLM's loader does, layer by layer, and a bucket never splits a module); the last
        tensor of each bucket is never such a view, so holding the current tensor is always safe.
        """
        try:
            for bucket in self.buckets:
                yield from self._bucket_tensors(bucket)
        finally:
            self._buffer = None

    def megatron_weights(self) -> Iterator[Named]:
        """The full (TP=1) Megatron tensors under global names, before the HF conversion (views valid
        until the next bucket). Collective."""
        try:
            for bucket in self.buckets:
                moved = [e for e in bucket.entries if self.groups.pp_size > 1 or e.rows > 1]
                offsets, buffer = self._gather(bucket, moved) if moved else ({}, None)
                yield from self._full_tensors(bucket, offsets, buffer)
        finally:
            self._buffer = None

    def _bucket_tensors(self, bucket: _Bucket) -> Iterator[Named]:
        moved = [e for e in bucket.entries if self.groups.pp_size > 1 or e.rows > 1]
        offsets, buffer = self._gather(bucket, moved) if moved else ({}, None)
        items = self._converted(bucket, offsets, buffer)
        previous = next(items, None)
        for item in items:
            yield previous
            previous = item
        if previous is None:
            return
        # A consumer holds the tensor it got while asking for the next one; a view would keep this
        # whole bucket alive during the next bucket's gather. So the last tensor is never a view.
        name, tensor = previous
        if buffer is not None and tensor.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
            tensor = tensor.clone()
        previous = item = items = buffer = None
        yield name, tensor

    def _converted(self, bucket: _Bucket, offsets: dict[str, int], buffer: Optional[torch.Tensor]) -> Iterator[Named]:
        for name, full in self._full_tensors(bucket, offsets, buffer):
            yield from nm.megatron_to_hf([(name, full)], self.arch)

    def _full_tensors(self, bucket: _Bucket, offsets: dict[str, int], buffer: Optional[torch.Tensor]) -> Iterator[Named]:
        for e in bucket.entries:
            if e.name in offsets:
                yield e.name, self._full(e, buffer[offsets[e.name]: offsets[e.name] + e.numel])
            else:  # nothing to communicate: the parameter itself
                yield e.name, self.local[e.name].detach()

    def _gather(self, bucket: _Bucket, moved: list[_Entry]) -> tuple[dict[str, int], torch.Tensor]:
        """The bucket's ``moved`` entries, TP shards side by side, on every rank of the pipeline."""
        g = self.groups
        offsets, total = {}, 0
        for e in moved:
            offsets[e.name], total = total, total + e.numel
        buffer = self._bucket_buffer(total, bucket.entries[0].dtype)
        if g.pp_rank == bucket.stage:
            with torch.no_grad():
                for e in moved:
                    slot, shard = buffer[offsets[e.name]: offsets[e.name] + e.numel], self.local[e.name].detach()
                    if e.rows > 1:
                        self._gather_tp(slot, shard)
                    else:
                        slot.copy_(shard.reshape(-1))
        if g.pp_size > 1:
            dist.broadcast(buffer, src=g.pp_ranks[bucket.stage], group=g.pp_group)
        return offsets, buffer

    def _bucket_buffer(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """One buffer for all buckets of a sync: a fresh allocation per bucket costs page faults on
        CPU (a 256 MiB ``torch.empty(...).copy_()`` runs at a third of the speed of a copy into
        memory already touched)."""
        nbytes = numel * dtype.itemsize
        if self._buffer is None or self._buffer.numel() < nbytes:
            largest = max(sum(e.numel * e.dtype.itemsize for e in b.entries) for b in self.buckets)
            self._buffer = torch.empty(max(largest, nbytes), dtype=torch.uint8, device=self.device)
        return self._buffer[:nbytes].view(dtype)

    def _gather_tp(self, slot: torch.Tensor, shard: torch.Tensor) -> None:
        """All TP ranks' shards into ``slot``, rank-major. gloo's all-gather is 5-8x slower than its
        broadcast (0.08 vs 0.5-0.8 GB/s, measured on the 2-core CPU machine), so on gloo each TP rank
        broadcasts its shard in turn; NCCL's all-gather is used as is."""
        g = self.groups
        if not self._tp_gather_by_broadcast:
            dist.all_gather_into_tensor(slot, shard.contiguous().view(-1), group=g.tp_group)
            return
        rows = slot.view(g.tp_size, -1)
        rows[g.tp_rank].copy_(shard.reshape(-1))
        for r, src in enumerate(self._tp_ranks):
            dist.broadcast(rows[r], src=src, group=g.tp_group)

    @staticmethod
    def _full(e: _Entry, slot: torch.Tensor) -> torch.Tensor:
        shards = slot.view(e.rows, *e.shard_shape)
        if e.rows == 1:
            return shards[0]
        if nm.tp_partition(e.name) == (0, 1):  # rank-major rows already are the full tensor
            return shards.view(e.rows * e.shard_shape[0], *e.shard_shape[1:])
        return nm.unshard(e.name, list(shards))


def hf_state_dict_of(chunks: list, groups, bucket_bytes: Optional[int] = None) -> dict[str, torch.Tensor]:
    """The whole model as HF tensors on every rank (tests and tools; a full copy, unlike streaming)."""
    sync = WeightResharder(chunks, groups, bucket_bytes or 1 << 62)
    return {name: t.clone() for name, t in sync.hf_weights()}
