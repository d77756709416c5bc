"""Megatron TP2 x PP2 -> vLLM rollout TP1 and TP2 under torchrun (4 ranks, gloo, CPU): exact weights,
greedy parity with HF, and the engine following a training-like update (``weight_sync_worker.py``'s
checks, run in the shared TP2 x PP2 launch of ``conftest.tp2_pp2_results``)."""

from __future__ import annotations

import pytest
import torch

from tests.rollout.conftest import load_hf_model, requires_vllm
from tests.rollout.test_transport import assert_streams_correct
from tests.rollout.test_vllm_distributed import hf_references, max_gap
from tests.rollout.weight_sync_worker import training_like_update

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow, requires_vllm]


def test_megatron_tp2_pp2_to_vllm_tp1_and_tp2(tp2_pp2_results, tiny_vl_dir, processor):
    from megatron_vgpo.rollout.vllm_engine import VISION_SPECIAL_TOKENS

    ranks = [r["sync"] for r in tp2_pp2_results]
    banned = processor.tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
    model = load_hf_model(tiny_vl_dir)
    tokens, logprobs, _ = hf_references(model, processor, banned)
    with torch.no_grad():
        for param in model.parameters():
            training_like_update(param)
    new_tokens, new_logprobs, _ = hf_references(model, processor, banned)
    assert new_tokens != tokens

    for rank, got in enumerate(ranks):
        assert_streams_correct(got, rank)
        for tp in (1, 2):
            assert got[f"rollout_tp{tp}"]["greedy"] == tokens, f"rank {rank}, rollout TP{tp}"
            assert max_gap(got[f"rollout_tp{tp}"]["logprobs"], logprobs) < 1e-4
        assert got["after_update"]["greedy"] == new_tokens, f"rank {rank}: the engine did not follow the update"
        assert max_gap(got["after_update"]["logprobs"], new_logprobs) < 1e-4
    last_stage = [got["mismatch"] for got in ranks if "mismatch" in got]
    assert len(last_stage) == 2  # the two TP ranks of the last pipeline stage
    for m in last_stage:
        assert m["tokens"] == sum(len(t) for t in new_tokens)
        assert m["max"] < 1e-4
    print(f"{ranks[0]['stream']['num_buckets']} buckets of <= {ranks[0]['bucket_bytes']} B; "
          f"rollout-vs-Megatron log-prob mismatch after the update: mean {last_stage[0]['mean']:.2e}, "
          f"max {last_stage[0]['max']:.2e}")
