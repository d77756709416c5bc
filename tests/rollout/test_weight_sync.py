"""Megatron -> HF weight streaming (``rollout/weight_sync.py``) in a world of one, and into a vLLM engine.

The TP2 x PP2 case (with rollout TP1 and TP2) runs under torchrun in ``test_weight_sync_distributed.py``.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoConfig

from megatron_vgpo.config.schema import ModelConfig, RolloutConfig
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights
from megatron_vgpo.models.qwen2_5_vl.name_mapping import canonical_hf_name
from megatron_vgpo.rollout import RolloutRequest, SamplingParams
from megatron_vgpo.rollout.weight_sync import WeightResharder, hf_state_dict_of
from tests.rollout.conftest import hf_greedy, load_hf_model, make_tiny_checkpoint, requires_vllm

F32 = ModelConfig(params_dtype="float32", attention_backend="local")


def policy(hf_dir, groups):
    chunks = build_policy(AutoConfig.from_pretrained(hf_dir), F32, groups)
    load_hf_weights(chunks, hf_dir)
    return chunks


def checkpoint_tensors(hf_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {canonical_hf_name(k): v for k, v in load_file(hf_dir / "model.safetensors").items()}


@pytest.mark.parametrize("tied", [False, True])
def test_stream_equals_the_checkpoint_exactly(tmp_path, world_of_one, tied):
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, write_tiny_checkpoint

    hf_dir = write_tiny_checkpoint(tmp_path / "tiny", TinyOptions(seed=2, init_std=0.1, tie_embeddings=tied))
    ref = checkpoint_tensors(hf_dir)
    if tied:
        ref.pop("lm_head.weight", None)
    got = hf_state_dict_of(policy(hf_dir, world_of_one), world_of_one)
    assert got.keys() == ref.keys()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_buckets_respect_the_limit_and_keep_modules_whole(tiny_vl_dir, world_of_one):
    chunks = policy(tiny_vl_dir, world_of_one)
    limit = 64 << 10
    sync = WeightResharder(chunks, world_of_one, bucket_bytes=limit)
    assert len(sync.buckets) > 10
    for bucket in sync.buckets:
        nbytes = sum(e.numel * e.dtype.itemsize for e in bucket.entries)
        modules = {e.module for e in bucket.entries}
        assert nbytes <= limit or len(modules) == 1, "only a module larger than the limit may exceed it"
    seen = [e.module for b in sync.buckets for e in b.entries]
    assert all(seen.index(m) == i or seen[i - 1] == m for i, m in enumerate(seen)), "a module was split"
    # TP = PP = 1: nothing to communicate, the parameters themselves are streamed (no copies).
    params = {p.data_ptr() for c in chunks for p in c.parameters()}
    direct = [t for _, t in sync.megatron_weights()]
    assert all(t.data_ptr() in params for t in direct)
    with pytest.raises(ValueError, match="bucket_bytes"):
        WeightResharder(chunks, world_of_one, bucket_bytes=0)


@pytest.mark.vllm
@requires_vllm
def test_dummy_engine_filled_from_megatron_generates_like_hf(tiny_vl_dir, world_of_one, processor, mm_prompt):
    """An engine built with random ("dummy") weights, filled only by the resharder, equals HF."""
    from megatron_vgpo.rollout.vllm_engine import VLLMRolloutEngine

    text, images, inputs = mm_prompt
    config = RolloutConfig(max_prompt_length=256, max_response_length=64, kv_cache_memory_bytes=64 << 20,
                           enforce_eager=True, enable_sleep_mode=False)
    env_before = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    engine = VLLMRolloutEngine(config, str(tiny_vl_dir), dtype="float32", load_format="dummy")
    # The external launcher needed RANK / LOCAL_RANK while building; left set, they would make the
    # next init_parallel of this process take it for a torchrun worker.
    assert {k: os.environ.get(k) for k in env_before} == env_before
    try:
        sync = WeightResharder(policy(tiny_vl_dir, world_of_one), world_of_one, bucket_bytes=256 << 10)
        request = RolloutRequest(processor.tokenizer(text)["input_ids"], images)
        greedy = SamplingParams(n=1, max_tokens=24, temperature=0.0)
        random_weights = engine.generate([request], greedy).response_token_ids[0]
        engine.update_weights(sync.hf_weights())
        batch = engine.generate([request], greedy)
    finally:
        engine.shutdown()
    ref_tokens, ref_logprobs = hf_greedy(load_hf_model(tiny_vl_dir), inputs, 24, engine.banned_token_ids)
    assert random_weights != ref_tokens
    assert batch.response_token_ids[0] == ref_tokens
    assert max(abs(a - b) for a, b in zip(batch.response_logprobs[0], ref_logprobs)) < 1e-4
