"""Megatron's M-RoPE equals Hugging Face Qwen2.5-VL's, checked numerically rather than assumed.

HF (``Qwen2_5_VLRotaryEmbedding`` + ``apply_rotary_pos_emb``): frequencies over the rotary half dim
are split into ``mrope_section`` chunks taken from the temporal / height / width position streams in
turn, then repeated twice. Megatron (``MultimodalRotaryEmbedding``) repeats first and splits by
``mrope_section * 2``. Same thing on paper; here on tensors, with three DIFFERENT position streams
(so a swapped section would show) and per-row positions.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb as hf_apply

from megatron_vgpo.models.qwen2_5_vl.config import arch_from_hf, mrope_section, rotary_base, transformer_config
from tests.conftest import tiny_hf_config


def test_megatron_mrope_matches_hf(world_of_one):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import MultimodalRotaryEmbedding

    hf_config = tiny_hf_config()
    arch = arch_from_hf(hf_config)
    config = transformer_config(hf_config, arch, world_of_one)
    gen = torch.Generator().manual_seed(0)
    batch, length, heads = 2, 11, arch.num_heads
    positions = torch.randint(0, 50, (3, batch, length), generator=gen)
    q = torch.randn(batch, heads, length, arch.head_dim, generator=gen)

    cos, sin = Qwen2_5_VLRotaryEmbedding(hf_config.text_config)(q, positions)
    expected, _ = hf_apply(q, q, cos, sin)  # [B, H, L, hd]

    rope = MultimodalRotaryEmbedding(kv_channels=arch.head_dim, rotary_percent=1.0, rotary_base=rotary_base(hf_config))
    freqs = rope(positions, mrope_section(hf_config))  # [L, B, 1, hd]
    got = apply_rotary_pos_emb(q.permute(2, 0, 1, 3), freqs, config)  # [L, B, H, hd]
    torch.testing.assert_close(got.permute(1, 2, 0, 3), expected, atol=1e-6, rtol=0)

    swapped = rope(positions[[1, 0, 2]], mrope_section(hf_config))
    assert (apply_rotary_pos_emb(q.permute(2, 0, 1, 3), swapped, config) - got).abs().max() > 1e-2
