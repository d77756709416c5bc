"""Shard-to-shard weight sync (rollout TP = trainer TP): what vLLM's TP rank r loads of each HF tensor
(``vllm_region``), how a Megatron TP shard becomes those pieces (``engine_pieces``), and the stream that
hands them to the engine (``ShardSync``, used by ``WeightResharder.engine_weights``). The layout
reasoning is in ``weight_sync.py``'s module docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import torch

from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm
from megatron_vgpo.rollout.transport import ShardTransport, layout
from megatron_vgpo.rollout.weight_sync import Named, WeightResharder, _Entry, _last_kept, _nbytes

VLLM_VOCAB_PADDING = 64
"""vLLM pads the vocabulary to a multiple of this (``DEFAULT_VOCAB_PADDING_SIZE``), then splits it evenly."""

# Split over TP by vLLM's layers (Qwen2 decoder and Qwen2.5-VL vision tower, ``mm_encoder_tp_mode``
# "weights", its default): column-parallel along dim 0, row-parallel along dim 1 (their biases are
# replicated), the vision tower's fused q/k/v as three dim-0 blocks. Every other tensor is loaded whole
# by every rank: a name missing here costs bytes, never correctness.
_VLLM_COLUMN = tuple(f"{m}.{p}" for m in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "merger.mlp.0")
                     for p in ("weight", "bias"))
_VLLM_ROW = ("o_proj.weight", "down_proj.weight", "attn.proj.weight", "merger.mlp.2.weight")
_VLLM_FUSED_QKV = ("attn.qkv.weight", "attn.qkv.bias")
_VLLM_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


@dataclass(frozen=True)
class Region:
    """What one engine TP rank loads of a full HF tensor: ``ranges`` ``(start, length)`` along ``dim``,
    side by side; ``dim`` None: all of it."""

    dim: Optional[int] = None
    ranges: tuple[tuple[int, int], ...] = ()

    def shape(self, full_shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.dim is None:
            return tuple(full_shape)
        return full_shape[:self.dim] + (sum(n for _, n in self.ranges),) + full_shape[self.dim + 1:]

    def of(self, full: torch.Tensor) -> torch.Tensor:
        """This region of ``full`` (a view when it is one range)."""
        if self.dim is None:
            return full
        parts = [full.narrow(self.dim, start, n) for start, n in self.ranges]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)

    def write(self, full: torch.Tensor, piece: torch.Tensor) -> None:
        """Copy ``piece`` (``shape(full.shape)``) to this region of ``full``, in place."""
        offset = 0
        for start, n in self.ranges:
            full.narrow(self.dim, start, n).copy_(piece.narrow(self.dim, offset, n))
            offset += n


def vllm_region(hf_name: str, full_shape: tuple[int, ...], tp_rank: int, tp_size: int) -> Region:
    """The region of HF tensor ``hf_name`` (shape ``full_shape``) that vLLM's TP rank ``tp_rank`` of
    ``tp_size`` loads: its weight loaders' ``narrow`` (linear layers split their output or input dim
    evenly, q/k/v by heads; the vocabulary is padded to ``VLLM_VOCAB_PADDING``, split evenly, and
    the rows past the real vocabulary are not loaded)."""
    if tp_size == 1:
        return Region()
    if hf_name in _VLLM_VOCAB:
        vocab = full_shape[0]
        per_rank = -(-vocab // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING // tp_size
        start, end = min(tp_rank * per_rank, vocab), min((tp_rank + 1) * per_rank, vocab)
        return Region(0, ((start, end - start),))
    if hf_name.endswith(_VLLM_COLUMN):
        dim, blocks = 0, 1
    elif hf_name.endswith(_VLLM_ROW):
        dim, blocks = 1, 1
    elif hf_name.endswith(_VLLM_FUSED_QKV):
        dim, blocks = 0, 3
    else:
        return Region()
    block = full_shape[dim] // blocks
    if block % tp_size:
        raise ValueError(f"'{hf_name}' dim {dim} of size {full_shape[dim]} does not split over TP={tp_size}")
    n = block // tp_size
    return Region(dim, tuple((k * block + tp_rank * n, n) for k in range(blocks)))


def vocab_aligned(arch) -> bool:
    """Whether each TP rank's Megatron vocabulary rows are the ones its vLLM rank loads (both paddings
    give the same rows per rank: true of the released Qwen2.5-VL vocabularies, 151936 and 152064)."""
    vllm_rows = -(-arch.vocab_size // VLLM_VOCAB_PADDING) * VLLM_VOCAB_PADDING
    return arch.tp_size == 1 or vllm_rows // arch.tp_size == arch.padded_vocab_size // arch.tp_size


def engine_pieces(name: str, tensor: torch.Tensor, arch, tp_rank: int, *, whole: bool) -> list[Named]:
    """What vLLM's TP rank ``tp_rank`` (of ``arch.tp_size``, the trainer's) loads of each HF tensor made
    from Megatron parameter ``name``: ``(hf_name, piece of vllm_region's shape)``.

    ``tensor`` is the full Megatron tensor (``whole=True``: converted, then cut) or this TP rank's
    Megatron shard (``whole=False``), which converts to the pieces directly: q/k/v of whole query
    groups, gate/up of a stride-2 shard, the row-parallel dim-1 slices, and the vocabulary rows
    (``vocab_aligned``; a shard's padding rows are at its end).
    """
    hf = list(nm.megatron_to_hf([(name, tensor)], arch))
    if whole:
        return [(n, vllm_region(n, tuple(t.shape), tp_rank, arch.tp_size).of(t)) for n, t in hf]
    if name in (nm.EMBEDDING, nm.OUTPUT):
        full_shape = (arch.vocab_size, *tensor.shape[1:])
        return [(n, tensor[:vllm_region(n, full_shape, tp_rank, arch.tp_size).shape(full_shape)[0]]) for n, _ in hf]
    return hf


@dataclass(frozen=True)
class _Piece:
    """One HF tensor as this rank's engine loads it (for the transport's layout: ``name``, ``shape``,
    ``numel``, ``dtype``)."""

    name: str  # HF name
    full_shape: tuple[int, ...]
    dtype: torch.dtype
    region: Region

    @property
    def shape(self) -> tuple[int, ...]:
        return self.region.shape(self.full_shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def carried(self) -> bool:
        """Handed to vLLM inside a full-shaped carrier (a partial region)."""
        return self.region.dim is not None


@dataclass(frozen=True)
class _ShardEntry:
    entry: _Entry
    source: str  # "shard": this TP rank's Megatron shard; "full": replicated; "gather": gathered over TP
    pieces: tuple[_Piece, ...]


class ShardSync:
    """The shard-to-shard stream of a ``WeightResharder`` (see the module docstring)."""

    def __init__(self, sync: WeightResharder, device: torch.device):
        self.sync, self.device, g = sync, device, sync.groups
        self.plan = [[self._entry(e) for e in bucket.entries] for bucket in sync.buckets]
        self.piece_bytes = [_nbytes(p for se in bucket for p in se.pieces) for bucket in self.plan]
        # Each bucket's carriers: the byte offset of each partial piece's full tensor, and the total.
        self.carriers = [layout([_FullTensor(p.name, math.prod(p.full_shape), p.dtype)
                                 for se in bucket for p in se.pieces if p.carried]) for bucket in self.plan]
        self.transport = ShardTransport(g, device)
        self.received = sum(n for b, n in zip(sync.buckets, self.piece_bytes) if b.stage != g.pp_rank)

    def _entry(self, e: _Entry) -> _ShardEntry:
        arch, r = self.sync.arch, self.sync.groups.tp_rank
        full = torch.empty(e.full_shape, dtype=e.dtype, device="meta")
        pieces = tuple(_Piece(n, tuple(t.shape), e.dtype, vllm_region(n, tuple(t.shape), r, arch.tp_size))
                       for n, t in nm.megatron_to_hf([(e.name, full)], arch))
        if e.rows == 1:
            return _ShardEntry(e, "full", pieces)
        if e.name in (nm.EMBEDDING, nm.OUTPUT) and not vocab_aligned(arch):
            return _ShardEntry(e, "gather", pieces)
        shard = torch.empty(e.shard_shape, dtype=e.dtype, device="meta")
        got = [(n, tuple(t.shape)) for n, t in engine_pieces(e.name, shard, arch, r, whole=False)]
        if got != [(p.name, p.shape) for p in pieces]:  # a layout this module does not know
            raise ValueError(f"'{e.name}': TP shard {r} converts to {got}, vLLM's rank {r} loads "
                             f"{[(p.name, p.shape) for p in pieces]}")
        return _ShardEntry(e, "shard", pieces)

    def stream(self) -> Iterator[Named]:
        g = self.sync.groups
        exchanged = self.piece_bytes if g.pp_size > 1 else [0] * len(self.plan)
        carriers = torch.empty(max((n for _, n in self.carriers), default=0), dtype=torch.uint8, device=self.device)
        reused = [m.data_ptr() for m in (carriers,) if m.numel()]
        self.transport.open(exchanged)
        if self.transport.buffer.numel():
            reused.append(self.transport.buffer.data_ptr())
        try:
            for bucket, plan, (offsets, _) in zip(self.sync.buckets, self.plan, self.carriers):
                items = self._bucket(bucket.stage, plan, carriers, offsets)
                yield from _last_kept(items, lambda t: t.untyped_storage().data_ptr() in reused)
        finally:
            self.sync.traffic = self.transport.traffic
            self.transport.close()

    def _bucket(self, stage: int, plan: list[_ShardEntry], carriers: torch.Tensor,
                offsets: dict[str, int]) -> Iterator[Named]:
        g = self.sync.groups
        pieces = [p for se in plan for p in se.pieces]
        tensors = [t for se in plan for t in self._local(se)] if g.pp_rank == stage else None
        if g.pp_size > 1:
            tensors = self.transport.exchange(stage, pieces, tensors)
        with torch.no_grad():
            for piece, tensor in zip(pieces, tensors):
                if piece.carried:
                    start = offsets[piece.name]
                    full = carriers[start: start + math.prod(piece.full_shape) * piece.dtype.itemsize]
                    full = full.view(piece.dtype).view(piece.full_shape)
                    piece.region.write(full, tensor)
                    tensor = full
                yield piece.name, tensor

    def _local(self, se: _ShardEntry) -> list[torch.Tensor]:
        """This rank's pieces of a parameter of its own stage."""
        tensor = self.sync.local[se.entry.name].detach()
        if se.source == "gather":
            tensor = self.transport.gather(se.entry.name, tensor)
        return [t for _, t in engine_pieces(se.entry.name, tensor, self.sync.arch, self.sync.groups.tp_rank,
                                            whole=se.source != "shard")]


class _FullTensor(NamedTuple):
    """A carried piece's full tensor, for ``transport.layout``."""

    name: str
    numel: int
    dtype: torch.dtype
