"""The Megatron Qwen2.5-VL policy in a world of one (TP = PP = 1) against Hugging Face: outputs,
M-RoPE positions, gradients, the vision switch, and the errors on bad inputs and checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_vgpo.config.schema import ModelConfig
from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy, use_te_spec
from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights
from megatron_vgpo.models.qwen2_5_vl.parity import compare, fixed_multimodal_batch, hf_reference, micro_batches
from megatron_vgpo.models.qwen2_5_vl.pipeline import run_pipeline
from tests.conftest import tiny_hf_config, tiny_hf_model
from tests.distributed.grad_worker import dapo_loss, policy_batches

F32 = ModelConfig(params_dtype="float32")


def policy(hf_model, groups, model_cfg=F32):
    chunks = build_policy(hf_model.config, model_cfg, groups)
    load_hf_weights(chunks, hf_model.state_dict().items())
    return chunks


@pytest.fixture(scope="module", params=["untied", "tied"])
def hf_model(request):
    return tiny_hf_model(tiny_hf_config(tie_word_embeddings=request.param == "tied"), seed=3)


def test_outputs_match_hf_on_the_mixed_batch(hf_model, world_of_one):
    chunk = policy(hf_model, world_of_one)[0].eval()
    batch = fixed_multimodal_batch(hf_model.config)
    with torch.no_grad():
        out = chunk(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
                    compute_entropy=True)
    ref_logprobs, ref_hidden = hf_reference(hf_model, batch)
    diffs = compare(batch, out.logprobs, out.hidden_states, ref_logprobs, ref_hidden)
    assert diffs["logprobs"] < 1e-5 and diffs["hidden_states"] < 1e-5, diffs
    assert out.hidden_states.shape == (3, batch.input_ids.shape[1], 128)

    log_p = torch.log_softmax(hf_model.lm_head(ref_hidden).float(), dim=-1)
    ref_entropy = -(log_p.exp() * log_p).sum(-1)
    valid = batch.attention_mask.bool()
    assert (out.entropy - ref_entropy)[valid].abs().max() < 1e-5


def test_position_ids_follow_hf_get_rope_index(hf_model, world_of_one):
    chunk = policy(hf_model, world_of_one)[0]
    batch = fixed_multimodal_batch(hf_model.config)
    ours = chunk.position_ids(batch.input_ids, batch.image_grid_thw, batch.attention_mask)
    theirs, _ = hf_model.model.get_rope_index(
        batch.input_ids, (batch.input_ids == hf_model.config.image_token_id).int(),
        image_grid_thw=batch.image_grid_thw, attention_mask=batch.attention_mask)
    valid = batch.attention_mask.bool()
    assert torch.equal(ours[:, valid], theirs[:, valid])


def test_gradients_match_hf(hf_model, world_of_one):
    """One backward of the DAPO loss (+ entropy bonus): Megatron TP1 gradients == HF autograd's."""
    chunks = policy(hf_model, world_of_one)
    batches = policy_batches(hf_model.config)
    num_tokens = int(sum(b.response_mask.sum() for b in batches))
    run_pipeline(chunks, batches, lambda b, out: dapo_loss(b, out, num_tokens), compute_entropy=True)
    arch = chunks[0].arch
    ours = dict(nm.megatron_to_hf(((n, p.grad) for n, p in chunks[0].named_parameters()), arch))

    hf_model.zero_grad()
    for batch in batches:
        out = hf_model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                             mm_token_type_ids=(batch.input_ids == hf_model.config.image_token_id).int())
        log_p = torch.log_softmax(hf_model.lm_head(out.last_hidden_state).float(), dim=-1)
        targets = torch.cat([batch.input_ids[:, 1:], torch.zeros_like(batch.input_ids[:, :1])], dim=1)
        hf_out = dataclasses.make_dataclass("Out", ["logprobs", "entropy"])(
            log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1))
        dapo_loss(batch, hf_out, num_tokens)[0].backward()
    theirs = {nm.canonical_hf_name(n): p.grad for n, p in hf_model.named_parameters()}
    if arch.tie_embeddings:
        theirs.pop("lm_head.weight", None)
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    print(f"max |grad(Megatron TP1) - grad(HF)| = {worst:.2e} over {len(ours)} tensors")
    assert worst < 1e-5
    assert all(ours[k].abs().max() > 0 for k in ours), "every tensor should receive a gradient"


def test_the_chunk_is_built_on_the_training_device_in_the_params_dtype(world_of_one):
    """``build_policy`` leaves nothing behind on the host or in another dtype: the HF vision tower is
    built on the host and the local spec's torch norms in float32, so both are moved/cast (on a GPU a
    forward would otherwise mix devices). The device here is ``meta``: every tensor must follow."""
    hf_model = tiny_hf_model(tiny_hf_config())
    chunk = build_policy(hf_model.config, ModelConfig(params_dtype="bfloat16"), world_of_one)[0]
    assert {p.dtype for p in chunk.parameters()} == {torch.bfloat16}
    meta = dataclasses.replace(world_of_one, device=torch.device("meta"))
    chunk = build_policy(hf_model.config, ModelConfig(params_dtype="float32"), meta)[0]
    assert {p.device.type for p in chunk.parameters()} == {"meta"}
    assert {b.device.type for b in chunk.buffers()} == {"meta"}


def test_freeze_vision(world_of_one):
    hf_model = tiny_hf_model(tiny_hf_config())
    chunk = build_policy(hf_model.config, dataclasses.replace(F32, freeze_vision=True), world_of_one)[0]
    assert not any(p.requires_grad for p in chunk.vision.parameters())
    assert all(p.requires_grad for p in chunk.language_model.parameters())


def test_left_padding_and_image_count_mismatch_are_refused(world_of_one):
    hf_model = tiny_hf_model(tiny_hf_config())
    chunk = policy(hf_model, world_of_one)[0]
    batch = fixed_multimodal_batch(hf_model.config)
    with pytest.raises(ValueError, match="right-padded"):
        chunk(batch.input_ids, batch.attention_mask.flip(1), batch.pixel_values, batch.image_grid_thw)
    n_first = 16  # patches of the first image (grid 1 x 4 x 4)
    with pytest.raises(ValueError, match="image"):
        chunk(batch.input_ids, batch.attention_mask, batch.pixel_values[n_first:], batch.image_grid_thw[1:])


def test_tp_that_does_not_divide_the_heads_is_named(world_of_one):
    hf_model = tiny_hf_model(tiny_hf_config())  # 4 heads, 2 kv heads
    with pytest.raises(ValueError, match=r"size=4 does not divide text_config.num_key_value_heads=2"):
        build_policy(hf_model.config, F32, dataclasses.replace(world_of_one, tp_size=4))
    with pytest.raises(ValueError, match=r"size=3 does not divide text_config.num_attention_heads=4"):
        build_policy(hf_model.config, F32, dataclasses.replace(world_of_one, tp_size=3))


def test_bad_checkpoints_are_named(world_of_one):
    hf_model = tiny_hf_model(tiny_hf_config())
    chunks = build_policy(hf_model.config, F32, world_of_one)
    state = dict(hf_model.state_dict())

    missing = {k: v for k, v in state.items() if k != "model.language_model.layers.2.mlp.down_proj.weight"}
    with pytest.raises(ValueError, match=r"missing tensor.*model\.layers\.2\.mlp\.down_proj\.weight"):
        load_hf_weights(chunks, missing.items())

    reshaped = {**state, "model.visual.blocks.1.attn.qkv.bias": torch.zeros(7)}
    with pytest.raises(ValueError, match=r"tensor 'visual\.blocks\.1\.attn\.qkv\.bias' has shape \(7,\)"):
        load_hf_weights(chunks, reshaped.items())

    extra = {**state, "model.language_model.layers.9.mlp.up_proj.weight": torch.zeros(256, 128)}
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.9\.mlp\.up_proj\.weight'"):
        load_hf_weights(chunks, extra.items())

    other = tiny_hf_model(tiny_hf_config(intermediate_size=192))  # a checkpoint of another config
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape"):
        load_hf_weights(chunks, other.state_dict().items())


def test_te_backend_without_transformer_engine_says_how_to_install():
    from megatron_vgpo.utils.deps import has

    if has("transformer_engine"):
        pytest.skip("transformer-engine is installed here")
    with pytest.raises(ImportError, match=r"transformer_engine.*pip install"):
        use_te_spec("te")
    assert use_te_spec("auto") is False


def test_micro_batches_keep_their_images(hf_model, world_of_one):
    """Each micro-batch of the parity batch carries exactly its rows' images (used by the tools)."""
    batch = fixed_multimodal_batch(hf_model.config)
    first, second = micro_batches(batch)
    merge = hf_model.config.vision_config.spatial_merge_size
    for mb in (first, second):
        n_tokens = int((mb.input_ids == hf_model.config.image_token_id).sum())
        assert n_tokens == int(mb.image_grid_thw.prod(-1).sum()) // merge**2
        assert mb.pixel_values.shape[0] == int(mb.image_grid_thw.prod(-1).sum())
    assert second.input_ids.shape[1] != first.input_ids.shape[1]


def test_a_pipeline_stage_reads_only_its_tensors():
    """``load_hf_weights`` from a directory skips (reads only the header of) other stages' tensors."""
    from megatron_vgpo.models.qwen2_5_vl.config import arch_from_hf
    from megatron_vgpo.models.qwen2_5_vl.loading import _needed_by

    arch = arch_from_hf(tiny_hf_config(tie_word_embeddings=True))
    last_stage = {nm.LAYER.format(3) + "mlp.linear_fc2.weight": None, nm.FINAL_NORM: None, nm.OUTPUT: None}
    needed = _needed_by(last_stage, arch)
    assert needed("model.layers.3.self_attn.q_proj.bias") and not needed("model.layers.1.self_attn.q_proj.bias")
    assert needed("model.embed_tokens.weight")  # tied: the last stage's output layer is loaded from it
    assert needed("model.norm.weight") and not needed("visual.patch_embed.proj.weight")


def test_recompute_activations_gives_the_same_gradients(world_of_one):
    """Full recomputation (decoder layers by Megatron, vision blocks by HF checkpointing) changes
    memory, not numbers: the gradients equal those of the plain backward."""
    hf_model = tiny_hf_model(tiny_hf_config(), seed=4)
    grads = {}
    for recompute in (False, True):
        chunks = policy(hf_model, world_of_one, ModelConfig(params_dtype="float32", recompute_activations=recompute))
        chunks[0].train()
        assert chunks[0].vision.is_gradient_checkpointing == recompute
        assert (chunks[0].config.recompute_granularity == "full") == recompute
        batches = policy_batches(hf_model.config)
        num_tokens = int(sum(b.response_mask.sum() for b in batches))
        run_pipeline(chunks, batches, lambda b, out: dapo_loss(b, out, num_tokens), compute_entropy=True)
        grads[recompute] = {n: p.grad.clone() for n, p in chunks[0].named_parameters()}
    assert grads[True].keys() == grads[False].keys()
    worst = max((grads[True][k] - grads[False][k]).abs().max().item() for k in grads[False])
    assert worst < 1e-6, worst
