"""Shapes of the released Qwen2.5-VL models and their exact parameter counts, without downloading.

The memory planner must size a 72B run on a laptop, where ``model.hf_path`` does not exist: this
table holds the config values of the four released sizes, and ``resolve_shape`` picks one from
``model.hf_path/config.json`` when that exists (any Qwen2.5-VL config, tiny test models included)
or else from the size named in the path (``.../Qwen2.5-VL-32B-Instruct``).

Parameter counts (exact; ``tests/planning`` checks them against the transformers model built on the
meta device). Language model, ``h`` hidden, ``a`` heads, ``g`` kv heads, ``d = h / a``, ``I`` MLP
width, ``V`` vocabulary:

    per layer   h (a + 2g) d + (a + 2g) d        q/k/v with bias
              + a d h                            attention output, no bias
              + 3 h I                            SwiGLU gate, up, down, no bias
              + 2 h                              the two RMSNorms
    embedding   V h;  final norm h;  output layer V h (untied at 7B/32B/72B; tied, counted once, at 3B)

Vision tower, ``c`` hidden, ``J`` MLP width, ``m`` merge size, ``o`` = the language model's hidden:

    patch embed 3 t p^2 c                        Conv3d without bias (t temporal, p spatial patch)
    per block   3 c^2 + 3 c  +  c^2 + c          qkv, proj (with bias)
              + 3 c J + 2 J + c                  SwiGLU with bias
              + 2 c                              the two RMSNorms
    merger      c + (m^2 c)^2 + m^2 c + m^2 c o + o
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping


class ArchitectureError(ValueError):
    """The model's shapes cannot be resolved (no config.json and no known size in the path)."""


@dataclass(frozen=True)
class VisionShape:
    """The Qwen2.5-VL vision tower (the same at every released size but for ``out_hidden_size`` and,
    at 32B and 72B, ``intermediate_size``)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 2048
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 112  # window attention's side in pixels (8 x 8 patches)
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)  # blocks with full attention over the image

    @property
    def pixels_per_patch(self) -> int:
        return self.patch_size ** 2

    @property
    def patches_per_token(self) -> int:
        """Patches merged into one language-model token (2 x 2)."""
        return self.spatial_merge_size ** 2


@dataclass(frozen=True)
class ModelShape:
    """The numbers the memory model needs about one Qwen2.5-VL model."""

    name: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    tie_embeddings: bool
    vision: VisionShape = field(default_factory=VisionShape)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _vision(out_hidden_size: int, intermediate_size: int = 3420) -> VisionShape:
    return VisionShape(out_hidden_size=out_hidden_size, intermediate_size=intermediate_size)


QWEN25_VL: dict[str, ModelShape] = {
    "3B": ModelShape("Qwen2.5-VL-3B", 36, 2048, 11008, 16, 2, 151936, True, _vision(2048)),
    "7B": ModelShape("Qwen2.5-VL-7B", 28, 3584, 18944, 28, 4, 152064, False, _vision(3584)),
    # The vision MLP is 3456 wide at 32B and 72B (the technical report's value, divisible by TP 8),
    # 3420 in the 3B and 7B checkpoints.
    "32B": ModelShape("Qwen2.5-VL-32B", 64, 5120, 27648, 40, 8, 152064, False, _vision(5120, 3456)),
    "72B": ModelShape("Qwen2.5-VL-72B", 80, 8192, 29568, 64, 8, 152064, False, _vision(8192, 3456)),
}
"""The released Qwen2.5-VL-{3,7,32,72}B(-Instruct) config values."""


def shape_from_hf_config(config: Any, name: str = "Qwen2.5-VL") -> ModelShape:
    """A ``ModelShape`` from a transformers ``Qwen2_5_VLConfig`` or a ``config.json`` dict.

    Both layouts of the JSON are read: the released one (text fields at the top level) and the
    one transformers >= 5 writes (a nested ``text_config``)."""
    get = (lambda obj, key, default=None: obj.get(key, default)) if isinstance(config, Mapping) else \
        (lambda obj, key, default=None: getattr(obj, key, default))
    text = get(config, "text_config") or config
    vision = get(config, "vision_config") or {}
    required = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size")
    missing = [key for key in required if get(text, key) is None]
    if missing:
        raise ArchitectureError(f"{name}: the config has no {', '.join(missing)}: not a Qwen2.5-VL config")
    hidden = get(text, "hidden_size")
    tie = get(config, "tie_word_embeddings")
    if tie is None:
        tie = get(text, "tie_word_embeddings", False)
    vis = VisionShape(
        depth=get(vision, "depth", 32), hidden_size=get(vision, "hidden_size", 1280),
        intermediate_size=get(vision, "intermediate_size", 3420), num_heads=get(vision, "num_heads", 16),
        out_hidden_size=get(vision, "out_hidden_size", hidden), patch_size=get(vision, "patch_size", 14),
        temporal_patch_size=get(vision, "temporal_patch_size", 2),
        spatial_merge_size=get(vision, "spatial_merge_size", 2),
        in_channels=get(vision, "in_channels", None) or get(vision, "in_chans", 3),
        window_size=get(vision, "window_size", 112),
        fullatt_block_indexes=tuple(get(vision, "fullatt_block_indexes", (7, 15, 23, 31))))
    return ModelShape(
        name=name, num_layers=get(text, "num_hidden_layers"), hidden_size=hidden,
        ffn_hidden_size=get(text, "intermediate_size"), num_heads=get(text, "num_attention_heads"),
        num_kv_heads=get(text, "num_key_value_heads"), vocab_size=get(text, "vocab_size"),
        tie_embeddings=bool(tie), vision=vis)


_SIZE_IN_PATH = re.compile(r"qwen2\.5-vl-(\d+)b", re.IGNORECASE)


def resolve_shape(hf_path: str) -> ModelShape:
    """The shape of ``model.hf_path``: its ``config.json`` when it exists, else the released size
    named in the path; ``ArchitectureError`` otherwise."""
    config_json = Path(hf_path) / "config.json" if hf_path else None
    if config_json is not None and config_json.is_file():
        try:
            config = json.loads(config_json.read_text())
        except (OSError, ValueError) as e:
            raise ArchitectureError(f"model.hf_path={hf_path!r}: cannot read {config_json}: {e}") from None
        return shape_from_hf_config(config, name=Path(hf_path).name)
    match = _SIZE_IN_PATH.search(hf_path or "")
    if match and f"{match.group(1)}B" in QWEN25_VL:
        return QWEN25_VL[f"{match.group(1)}B"]
    raise ArchitectureError(
        f"model.hf_path={hf_path!r}: no config.json there and no released size (Qwen2.5-VL-"
        f"{{{','.join(k.removesuffix('B') for k in QWEN25_VL)}}}B) in the path, so the model's shapes are unknown")


# ------------------------------------------------------------------------------ parameter counts

def decoder_layer_params(shape: ModelShape, tp: int = 1) -> int:
    """Parameters of one decoder layer on one TP rank (norms replicated, the rest sharded by ``tp``)."""
    h, d = shape.hidden_size, shape.head_dim
    qkv_out = (shape.num_heads + 2 * shape.num_kv_heads) * d
    sharded = h * qkv_out + qkv_out + shape.num_heads * d * h + 3 * h * shape.ffn_hidden_size
    return sharded // tp + 2 * h


def embedding_params(shape: ModelShape, tp: int = 1) -> int:
    """Word embedding (or output layer) rows of one TP rank: the vocabulary padded to a multiple of
    ``tp`` (``models/qwen2_5_vl/config.padded_vocab_size``), split evenly."""
    padded = -(-shape.vocab_size // tp) * tp
    return padded // tp * shape.hidden_size


def vision_block_params(v: VisionShape) -> int:
    c, j = v.hidden_size, v.intermediate_size
    return (3 * c * c + 3 * c) + (c * c + c) + (3 * c * j + 2 * j + c) + 2 * c


def vision_params(v: VisionShape) -> int:
    """All parameters of the vision tower (patch embed, blocks, merger)."""
    c, m2 = v.hidden_size, v.spatial_merge_size ** 2
    patch_embed = v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * c
    merger = c + (m2 * c) ** 2 + m2 * c + m2 * c * v.out_hidden_size + v.out_hidden_size
    return patch_embed + v.depth * vision_block_params(v) + merger


def language_model_params(shape: ModelShape) -> int:
    """Embedding, decoder, final norm and output layer (counted once when tied)."""
    output = 0 if shape.tie_embeddings else embedding_params(shape)
    return embedding_params(shape) + shape.num_layers * decoder_layer_params(shape) + shape.hidden_size + output


def total_params(shape: ModelShape) -> int:
    """Parameters of the HF model (``sum(p.numel() for p in model.parameters())``)."""
    return language_model_params(shape) + vision_params(shape.vision)
