"""The Qwen2.5-VL HF <-> Megatron name mapping: layouts, TP shards and a bit-exact round trip."""

from __future__ import annotations

import pytest
import torch

from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm
from megatron_vgpo.models.qwen2_5_vl.config import arch_from_hf
from tests.conftest import tiny_hf_config, tiny_hf_model


@pytest.fixture(scope="module", params=["untied", "tied"])
def hf_state(request):
    config = tiny_hf_config(tie_word_embeddings=request.param == "tied")
    model = tiny_hf_model(config)
    state = {nm.canonical_hf_name(k): v.clone() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")  # what save_pretrained writes for a tied model
    return config, state


def test_round_trip_hf_to_tp2_shards_and_back_is_bit_exact(hf_state):
    config, state = hf_state
    arch = arch_from_hf(config, tp_size=2)
    per_rank = [dict(nm.hf_to_megatron_shards(state.items(), arch, rank)) for rank in range(2)]
    assert per_rank[0][nm.EMBEDDING].shape == (151, 128)  # vocab 301 padded to 302, halved
    back = dict(nm.megatron_shards_to_hf(((n, [r[n] for r in per_rank]) for n in per_rank[0]), arch))
    assert back.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_qkv_is_grouped_q_k_v_per_kv_group():
    arch = arch_from_hf(tiny_hf_config(), tp_size=1)  # 4 heads, 2 kv groups, head_dim 32
    hd = arch.head_dim
    q = torch.arange(4).repeat_interleave(hd).float()  # head h holds value h
    k = 10 + torch.arange(2).repeat_interleave(hd).float()
    v = 20 + torch.arange(2).repeat_interleave(hd).float()
    fused = nm.fuse_qkv(q, k, v, arch)
    heads = fused.view(-1, hd)[:, 0].tolist()
    assert heads == [0, 1, 10, 20, 2, 3, 11, 21]
    assert all(torch.equal(a, b) for a, b in zip(nm.split_qkv(fused, arch), (q, k, v)))
    # TP=2: rank r holds kv group r whole
    rank1 = nm.shard(nm.LAYER.format(0) + "self_attention.linear_qkv.bias", fused, 1, 2)
    assert rank1.view(-1, hd)[:, 0].tolist() == [2, 3, 11, 21]


def test_fc1_shards_hold_gate_and_up_halves():
    gate, up = torch.arange(8.0).view(8, 1), 100 + torch.arange(8.0).view(8, 1)
    name = nm.LAYER.format(3) + "mlp.linear_fc1.weight"
    full = torch.cat([gate, up])
    rank1 = nm.shard(name, full, 1, 2)
    assert torch.equal(rank1, torch.cat([gate[4:], up[4:]]))
    assert torch.equal(nm.unshard(name, [nm.shard(name, full, r, 2) for r in range(2)]), full)


def test_partition_dims():
    assert nm.tp_partition(nm.LAYER.format(0) + "self_attention.linear_proj.weight") == (1, 1)
    assert nm.tp_partition(nm.LAYER.format(0) + "mlp.linear_fc2.weight") == (1, 1)
    assert nm.tp_partition(nm.OUTPUT) == (0, 1)
    assert nm.tp_partition(nm.FINAL_NORM) == (None, 1)
    assert nm.tp_partition("vision.blocks.0.attn.qkv.weight") == (None, 1)


def test_te_spec_names_fuse_the_norms():
    arch = arch_from_hf(tiny_hf_config(), tp_size=1, te_fused_norms=True)
    out = dict(nm.hf_to_megatron([("model.layers.2.input_layernorm.weight", torch.ones(128)),
                                  ("model.layers.2.post_attention_layernorm.weight", torch.ones(128))], arch))
    assert set(out) == {nm.LAYER.format(2) + "self_attention.linear_qkv.layer_norm_weight",
                        nm.LAYER.format(2) + "mlp.linear_fc1.layer_norm_weight"}


def test_in_memory_transformers5_names_are_accepted():
    name = "model.language_model.layers.0.mlp.up_proj.weight"
    assert nm.canonical_hf_name(name) == "model.layers.0.mlp.up_proj.weight"
    assert nm.canonical_hf_name("model.visual.merger.ln_q.weight") == "visual.merger.ln_q.weight"


def test_unknown_and_incomplete_tensors_are_named():
    arch = arch_from_hf(tiny_hf_config(), tp_size=1)
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.rotary.weight'"):
        list(nm.hf_to_megatron([("model.layers.0.self_attn.rotary.weight", torch.zeros(1))], arch))
    parts = [("model.layers.0.self_attn.q_proj.weight", torch.zeros(128, 128)),
             ("model.layers.0.self_attn.v_proj.weight", torch.zeros(64, 128))]
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        list(nm.hf_to_megatron(parts, arch))
