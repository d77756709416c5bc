"""What a Qwen2.5-VL Megatron distributed checkpoint contains, derived from an HF config.

The HF <-> Megatron naming and layouts are NOT here: they are ``models/qwen2_5_vl/name_mapping.py``
(full, TP=1 tensors, global layer indices), used as is. This module adds the one rule of Megatron's
checkpoint format on top: how ``GPTModel.sharded_state_dict()`` turns module tensors into global
checkpoint tensors (verified against the real model by ``tests/checkpoint``):

- a decoder-layer tensor ``language_model.decoder.layers.{i}.X`` is layer ``i`` of the global tensor
  ``language_model.decoder.layers.X``, of shape ``[num_layers, *shape]`` (layers stacked first, so
  the key does not depend on how PP splits the layers);
- the keys are Transformer-Engine's with either layer spec (the local spec maps its
  ``input_layernorm`` / ``pre_mlp_layernorm`` onto ``linear_qkv.layer_norm_weight`` /
  ``linear_fc1.layer_norm_weight``), so the mapping is used with ``te_fused_norms=True``;
- every other tensor (embedding, final norm, output layer, the replicated vision tower
  ``vision.*``) is its own global tensor, at its full shape;
- ``linear_fc1``'s global layout is ``[gate; up]`` of the full MLP (each TP rank's
  ``[gate_r; up_r]`` is two boxes of it); ``linear_qkv``'s is the kv-group-major ``[q, k, v]``
  order, whose TP shards are contiguous: exactly the TP=1 tensors of the name mapping;
- word embeddings and output layer are stored UNPADDED (``vocab_size`` rows): Megatron loads them
  with ``allow_shape_mismatch`` and zero-fills its TP padding rows, so one checkpoint fits every TP;
- each linear layer has an ``_extra_state`` object (``None`` for the local spec and for TE without
  FP8) that ``dist_checkpointing.load`` requests, keyed ``<key>/shard_{layer}_{num_layers}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_vgpo.checkpoint.dist_io import GlobalTensor, layer_chunks, whole_chunk
from megatron_vgpo.checkpoint.hf_io import TensorInfo
from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm
from megatron_vgpo.models.qwen2_5_vl.config import arch_from_hf, check_tp_divides

_LAYERS = "language_model.decoder.layers."
_STACKED = re.compile(r"^(language_model\.decoder\.layers\.)(\d+)\.(.+)$")
_EXTRA_STATE_MODULES = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")
VOCAB_KEYS = (nm.EMBEDDING, nm.OUTPUT)  # stored unpadded; a training run's checkpoint may pad them


def checkpoint_arch(hf_config):
    """The name-mapping arch of the checkpoint format: full tensors (TP=1), TE key names."""
    return arch_from_hf(hf_config, tp_size=1, te_fused_norms=True)


def check_layout(hf_config, tp: int, pp: int) -> None:
    """ValueError naming the config field when TP or PP does not fit the model."""
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp and --pp must be >= 1, got tp={tp} pp={pp}")
    check_tp_divides(hf_config, tp)
    layers = hf_config.text_config.num_hidden_layers
    if layers % pp:
        raise ValueError(f"--pp={pp} does not divide text_config.num_hidden_layers={layers}: every pipeline "
                         f"stage must hold the same number of decoder layers")


def dist_key(megatron_name: str) -> tuple[str, Optional[int]]:
    """``(checkpoint key, layer index or None)`` of a full Megatron tensor name."""
    match = _STACKED.match(megatron_name)
    if match:
        return match.group(1) + match.group(3), int(match.group(2))
    return megatron_name, None


def is_stacked(key: str) -> bool:
    """Whether checkpoint key ``key`` stacks the decoder layers on its first axis."""
    return key.startswith(_LAYERS)


def megatron_name(key: str, layer: Optional[int]) -> str:
    """Inverse of ``dist_key``."""
    if layer is None:
        return key
    return f"{_LAYERS}{layer}.{key[len(_LAYERS):]}"


@dataclass
class CheckpointPlan:
    """The global tensors of the checkpoint of one HF config, and how to name their chunks."""

    arch: object  # QwenVLArch of the checkpoint format
    tensors: list[GlobalTensor]
    num_layers: int

    def by_key(self) -> dict[str, GlobalTensor]:
        return {t.key: t for t in self.tensors}

    def extra_state_objects(self) -> dict[str, list]:
        """Megatron's per-layer ``_extra_state`` objects, as its save writes them (``[None]``)."""
        n = self.num_layers
        return {f"language_model.decoder.layers.{m}._extra_state/shard_{i}_{n}": [None]
                for i in range(n) for m in _EXTRA_STATE_MODULES}


def plan_checkpoint(hf_config, hf_tensors: dict[str, TensorInfo],
                    dtype: Optional[torch.dtype] = None) -> CheckpointPlan:
    """The checkpoint of ``hf_config`` from HF tensors of the given shapes: the name mapping is run on
    meta tensors, so the plan costs no memory. ``dtype`` None keeps each tensor's HF dtype."""
    arch = checkpoint_arch(hf_config)
    meta = ((name, torch.empty(info.shape, dtype=info.dtype, device="meta")) for name, info in hf_tensors.items()
            if not nm.is_tied_duplicate(name, arch))
    layers: dict[str, dict[int, torch.Tensor]] = {}
    tensors: list[GlobalTensor] = []
    for name, tensor in nm.hf_to_megatron(meta, arch):
        key, layer = dist_key(name)
        dt = dtype or tensor.dtype
        if layer is None:
            tensors.append(GlobalTensor(key, tuple(tensor.shape), dt, whole_chunk(tuple(tensor.shape))))
        else:
            layers.setdefault(key, {})[layer] = tensor.new_empty(tensor.shape, dtype=dt)
    num_layers = hf_config.text_config.num_hidden_layers
    for key, per_layer in layers.items():
        tensors.append(_stacked(key, per_layer, num_layers))
    return CheckpointPlan(arch, tensors, num_layers)


def _stacked(key: str, per_layer: dict[int, torch.Tensor], num_layers: int) -> GlobalTensor:
    if sorted(per_layer) != list(range(num_layers)):
        missing = sorted(set(range(num_layers)) - set(per_layer))
        raise ValueError(f"'{key}': layers {missing} missing for text_config.num_hidden_layers={num_layers}")
    shape = tuple(per_layer[0].shape)
    for i, t in per_layer.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"'{megatron_name(key, i)}' has shape {tuple(t.shape)}, layer 0 has {shape}")
    return GlobalTensor(key, (num_layers, *shape), per_layer[0].dtype, layer_chunks(num_layers, shape))


def hf_outputs(key: str, layer: Optional[int], shape: tuple[int, ...], dtype: torch.dtype,
               arch) -> list[tuple[str, TensorInfo]]:
    """The HF ``(name, info)`` that one chunk (a layer, or a whole tensor) of ``key`` converts to."""
    meta = torch.empty(shape, dtype=dtype, device="meta")
    return [(name, TensorInfo(tuple(t.shape), t.dtype))
            for name, t in nm.megatron_to_hf([(megatron_name(key, layer), meta)], arch)]
