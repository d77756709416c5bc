"""Qwen2.5-VL state-dict adapter: Hugging Face <-> Megatron names and layouts, tensor by tensor.

The one place that knows how the two layouts differ; the HF -> Megatron loader, the checkpoint
conversion scripts and the runtime Megatron -> vLLM weight resharder all go through it. Pure
functions on ``(name, tensor)`` iterators, so a 72B checkpoint streams through with at most one
decoder layer's q/k/v or gate/up tensors buffered.

Two levels:
1. ``hf_to_megatron`` / ``megatron_to_hf``: HF tensors <-> FULL (TP=1) Megatron tensors.
   - q/k/v (weights AND biases) fuse into ``linear_qkv`` grouped per kv group: for each of the
     ``num_kv_heads`` groups, its ``num_heads / num_kv_heads`` query heads, then its key head, then
     its value head (``[q, k, v]`` per group, Megatron's layout).
   - ``gate_proj`` / ``up_proj`` fuse into ``linear_fc1`` as ``[gate; up]``.
   - ``embed_tokens`` / ``lm_head`` are zero-padded to ``padded_vocab_size`` rows (TP-divisible) and
     un-padded on the way back. With tied embeddings HF stores only ``embed_tokens``; Megatron's last
     pipeline stage keeps its own copy as ``output_layer.weight`` (the loader fills it from
     ``embed_tokens``), and ``megatron_to_hf`` drops ``output_layer.weight``.
   - Vision tower parameters pass through: ``visual.X`` <-> ``vision.X``.
   Layer indices in Megatron names are GLOBAL here (``language_model.decoder.layers.{i}``); a
   pipeline chunk numbers its layers from 0, see ``loading.py`` for the offset.
2. ``shard`` / ``unshard``: a full Megatron tensor <-> the TP shards, using ``tp_partition``:
   column-parallel weights (``linear_qkv``, ``linear_fc1``, embeddings, output layer) split dim 0,
   row-parallel ones (``linear_proj``, ``linear_fc2``) dim 1, norms and the vision tower are
   replicated. ``linear_fc1`` has partition stride 2: TP rank r holds ``[gate_r; up_r]``, not a
   contiguous slice of ``[gate; up]``. ``linear_qkv`` splits contiguously because its kv groups are
   contiguous and TP divides their number. ``hf_to_megatron_shards`` / ``megatron_shards_to_hf``
   compose the two levels (HF tensors <-> one TP rank's shards / all ranks' shards).

HF names are the on-disk ones (``model.layers.*``, ``model.embed_tokens``, ``lm_head``, ``visual.*``),
which is what ``save_pretrained`` writes and the released checkpoints use; the in-memory names of
transformers 5 (``model.language_model.*``, ``model.visual.*``) are accepted on input.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator, Optional

import torch

from megatron_vgpo.models.qwen2_5_vl.config import QwenVLArch

Named = tuple[str, torch.Tensor]

LM = "language_model."
EMBEDDING = LM + "embedding.word_embeddings.weight"
OUTPUT = LM + "output_layer.weight"
FINAL_NORM = LM + "decoder.final_layernorm.weight"
LAYER = LM + "decoder.layers.{}."
VISION = "vision."

_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_MEG_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.(.+)$")


def _layer_names(arch: QwenVLArch) -> dict[str, str]:
    """HF suffix -> Megatron suffix of the one-to-one tensors of a decoder layer."""
    te = arch.te_fused_norms
    return {
        "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight",
        "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight",
        "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
        "mlp.down_proj.weight": "mlp.linear_fc2.weight",
    }


_FUSED = {  # HF suffixes fused into one Megatron suffix, in Megatron's order
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
_FUSED_BY_PART = {part: (fused, parts) for fused, parts in _FUSED.items() for part in parts}


def hf_layer_index(name: str) -> Optional[int]:
    """Decoder layer index of an HF name (``model.layers.{i}.*``), None for other tensors."""
    match = _HF_LAYER.match(name)
    return int(match.group(1)) if match else None


def megatron_layer_index(name: str) -> Optional[int]:
    """Global decoder layer index of a Megatron mapping name, None for other tensors."""
    match = _MEG_LAYER.match(name)
    return int(match.group(1)) if match else None


def canonical_hf_name(name: str) -> str:
    """The on-disk HF name of a (possibly transformers-5 in-memory) parameter name."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


# ---- vocabulary padding -------------------------------------------------------------------------

def pad_vocab(tensor: torch.Tensor, arch: QwenVLArch) -> torch.Tensor:
    """``[V, d] -> [V_padded, d]`` with zero rows (never read: log-probs slice them off)."""
    extra = arch.padded_vocab_size - tensor.shape[0]
    return tensor if extra == 0 else torch.cat([tensor, tensor.new_zeros(extra, *tensor.shape[1:])])


def unpad_vocab(tensor: torch.Tensor, arch: QwenVLArch) -> torch.Tensor:
    return tensor[: arch.vocab_size]


# ---- q/k/v grouping -----------------------------------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: QwenVLArch) -> torch.Tensor:
    """HF q ``[nq*hd, ...]``, k/v ``[ng*hd, ...]`` -> Megatron ``[ng*(nq/ng + 2)*hd, ...]`` grouped
    ``[q heads of group g, k_g, v_g]`` for g = 0..ng-1 (works for weights and biases)."""
    ng, rest = arch.num_kv_heads, q.shape[1:]
    parts = [t.reshape(ng, -1, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, arch: QwenVLArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of ``fuse_qkv`` for a full (or any whole-group) fused tensor."""
    hd, rep, rest = arch.head_dim, arch.heads_per_group, qkv.shape[1:]
    grouped = qkv.reshape(-1, (rep + 2) * hd, *rest)
    q, k, v = grouped.split([rep * hd, hd, hd], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


# ---- HF -> Megatron -----------------------------------------------------------------------------

def _hf_single(name: str, tensor: torch.Tensor, arch: QwenVLArch) -> Optional[Named]:
    """Megatron (name, tensor) of an HF tensor that maps one-to-one; None when it is part of a fusion."""
    if name == "model.embed_tokens.weight":
        return EMBEDDING, pad_vocab(tensor, arch)
    if name == "lm_head.weight":
        return (None if arch.tie_embeddings else (OUTPUT, pad_vocab(tensor, arch)))
    if name == "model.norm.weight":
        return FINAL_NORM, tensor
    if name.startswith("visual."):
        return VISION + name[len("visual."):], tensor
    match = _HF_LAYER.match(name)
    if match and match.group(2) in _layer_names(arch):
        return LAYER.format(match.group(1)) + _layer_names(arch)[match.group(2)], tensor
    if match and match.group(2) in _FUSED_BY_PART:
        return None
    raise ValueError(f"unexpected tensor '{name}': not a parameter of a Qwen2.5-VL model")


def is_tied_duplicate(hf_name: str, arch: QwenVLArch) -> bool:
    """``lm_head.weight`` of a tied checkpoint: a copy of ``embed_tokens``, ignored when loading."""
    return arch.tie_embeddings and canonical_hf_name(hf_name) == "lm_head.weight"


def hf_to_megatron(items: Iterable[Named], arch: QwenVLArch) -> Iterator[Named]:
    """Stream HF ``(name, tensor)`` pairs into full (TP=1) Megatron ``(name, tensor)`` pairs.

    q/k/v and gate/up of a layer are buffered until all parts arrived (any order). Raises
    ValueError on a name that is not a Qwen2.5-VL parameter, and at the end of the stream on
    fusions left incomplete (naming the missing HF tensors).
    """
    pending: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, tensor in items:
        name = canonical_hf_name(name)
        single = _hf_single(name, tensor, arch)
        if single is not None:
            yield single
            continue
        match = _HF_LAYER.match(name)
        if not match:
            continue  # tied lm_head
        layer, part = match.groups()
        fused, parts = _FUSED_BY_PART[part]
        group = pending.setdefault((layer, fused), {})
        group[part] = tensor
        if len(group) == len(parts):
            del pending[(layer, fused)]
            tensors = [group[p] for p in parts]
            full = fuse_qkv(*tensors, arch) if len(parts) == 3 else torch.cat(tensors, dim=0)
            yield LAYER.format(layer) + fused, full
    if pending:
        missing = [f"model.layers.{layer}.{p}" for (layer, fused), got in pending.items()
                   for p in _FUSED[fused] if p not in got]
        raise ValueError(f"missing tensor(s) {missing[:6]}{' ...' if len(missing) > 6 else ''}")


def hf_sources(megatron_name: str, arch: QwenVLArch) -> tuple[str, ...]:
    """The on-disk HF names ``hf_to_megatron`` builds the full Megatron tensor ``megatron_name``
    from, in its fusion order: lets a converter compute any one Megatron tensor on demand."""
    fixed = {EMBEDDING: "model.embed_tokens.weight", OUTPUT: "lm_head.weight", FINAL_NORM: "model.norm.weight"}
    if megatron_name in fixed:
        return (fixed[megatron_name],)
    if megatron_name.startswith(VISION):
        return ("visual." + megatron_name[len(VISION):],)
    match = _MEG_LAYER.match(megatron_name)
    single = {meg: hf for hf, meg in _layer_names(arch).items()}
    if match and match.group(2) in single:
        return (f"model.layers.{match.group(1)}.{single[match.group(2)]}",)
    if match and match.group(2) in _FUSED:
        return tuple(f"model.layers.{match.group(1)}.{part}" for part in _FUSED[match.group(2)])
    raise ValueError(f"unknown Megatron parameter '{megatron_name}'")


# ---- Megatron -> HF -----------------------------------------------------------------------------

def megatron_to_hf(items: Iterable[Named], arch: QwenVLArch) -> Iterator[Named]:
    """Stream full (TP=1, global layer index) Megatron tensors into HF ``(name, tensor)`` pairs."""
    single = {}
    for hf_suffix, meg_suffix in _layer_names(arch).items():
        single[meg_suffix] = hf_suffix
    for name, tensor in items:
        if name == EMBEDDING:
            yield "model.embed_tokens.weight", unpad_vocab(tensor, arch)
        elif name == OUTPUT:
            if not arch.tie_embeddings:
                yield "lm_head.weight", unpad_vocab(tensor, arch)
        elif name == FINAL_NORM:
            yield "model.norm.weight", tensor
        elif name.startswith(VISION):
            yield "visual." + name[len(VISION):], tensor
        else:
            yield from _megatron_layer_to_hf(name, tensor, arch, single)


def _megatron_layer_to_hf(name: str, tensor: torch.Tensor, arch: QwenVLArch, single: dict) -> Iterator[Named]:
    match = _MEG_LAYER.match(name)
    if not match or (match.group(2) not in single and match.group(2) not in _FUSED):
        if name.endswith("_extra_state"):
            return  # TE / Megatron bookkeeping, not a weight
        raise ValueError(f"unexpected Megatron tensor '{name}'")
    layer, suffix = match.groups()
    prefix = f"model.layers.{layer}."
    if suffix in single:
        yield prefix + single[suffix], tensor
        return
    parts = split_qkv(tensor, arch) if suffix.startswith("self_attention") else tensor.chunk(2, dim=0)
    for hf_suffix, part in zip(_FUSED[suffix], parts):
        yield prefix + hf_suffix, part.contiguous()


# ---- tensor-parallel shards ---------------------------------------------------------------------

def tp_partition(megatron_name: str) -> tuple[Optional[int], int]:
    """``(partition dim or None if replicated, partition stride)`` of a Megatron parameter."""
    if megatron_name.startswith(VISION) or "layernorm" in megatron_name or "layer_norm" in megatron_name:
        return None, 1
    if megatron_name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1, 1
    if megatron_name.endswith("linear_fc1.weight"):
        return 0, 2
    if megatron_name.endswith(("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight",
                               "output_layer.weight")):
        return 0, 1
    raise ValueError(f"unknown Megatron parameter '{megatron_name}'")


def shard(megatron_name: str, full: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s shard of a full Megatron tensor (a view where possible)."""
    dim, stride = tp_partition(megatron_name)
    if dim is None or tp_size == 1:
        return full
    if full.shape[dim] % (tp_size * stride):
        raise ValueError(f"'{megatron_name}' dim {dim} of size {full.shape[dim]} does not split over TP={tp_size}")
    if stride == 1:
        return full.chunk(tp_size, dim=dim)[tp_rank]
    return torch.cat([part.chunk(tp_size, dim=dim)[tp_rank] for part in full.chunk(stride, dim=dim)], dim=dim)


def write_shard(megatron_name: str, full: torch.Tensor, shard_: torch.Tensor, tp_rank: int, tp_size: int) -> None:
    """Copy TP rank ``tp_rank``'s shard (``shard``) to its place in ``full``, in place (the weight
    sync writes shards straight into shared memory with it; ``unshard`` builds on it).

    A partition of stride s cuts the full tensor into ``s * tp_size`` equal chunks along its dim and
    rank r holds chunks r, tp + r, ..., (s-1)*tp + r side by side: chunk k of the shard is chunk
    ``k*tp + r`` of the full tensor. Writing every rank's shard rebuilds the full tensor exactly."""
    dim, stride = tp_partition(megatron_name)
    size = shard_.shape[dim] // stride
    for k in range(stride):
        full.narrow(dim, (k * tp_size + tp_rank) * size, size).copy_(shard_.narrow(dim, k * size, size))


def unshard(megatron_name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full Megatron tensor from all TP ranks' shards (rank order); inverse of ``shard``."""
    dim, stride = tp_partition(megatron_name)
    if dim is None or len(shards) == 1:
        return shards[0]
    shape = list(shards[0].shape)
    shape[dim] *= len(shards)
    full = shards[0].new_empty(shape)
    for rank, piece in enumerate(shards):
        write_shard(megatron_name, full, piece, rank, len(shards))
    return full


def hf_to_megatron_shards(items: Iterable[Named], arch: QwenVLArch, tp_rank: int) -> Iterator[Named]:
    """HF ``(name, tensor)`` pairs -> this TP rank's Megatron shards (``arch.tp_size`` ranks)."""
    for name, full in hf_to_megatron(items, arch):
        yield name, shard(name, full, tp_rank, arch.tp_size)


def megatron_shards_to_hf(items: Iterable[tuple[str, list[torch.Tensor]]], arch: QwenVLArch) -> Iterator[Named]:
    """``(Megatron name, [shard of TP rank 0, 1, ...])`` pairs -> HF ``(name, tensor)`` pairs."""
    yield from megatron_to_hf(((name, unshard(name, shards)) for name, shards in items), arch)
