"""Colocated SPMD rollouts under torchrun (2 ranks, gloo, CPU): vLLM's ``external_launcher`` inside the
trainer's world, rollout data-parallel groups, rollout TP=2 and weight updates (``vllm_tp_worker.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_torchrun
from tests.rollout.conftest import (
    QUESTION, chat_prompt, hf_greedy, load_hf_model, perturbed, random_image, requires_vllm,
)
from tests.rollout.vllm_tp_worker import PERTURBED

WORKER = Path(__file__).with_name("vllm_tp_worker.py")
pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow, requires_vllm]


def hf_references(model, processor, banned) -> tuple[list, list, list]:
    """HF greedy tokens and raw log-probs for the worker's three requests, and the prompt ids."""
    tokens, logprobs, prompts = [], [], []
    for k, num_images in enumerate((1, 0, 1)):
        text = chat_prompt(processor, f"{QUESTION} ({k})", num_images)
        inputs = processor(text=[text], images=[random_image(seed=k)] * num_images or None, return_tensors="pt")
        t, lp = hf_greedy(model, inputs, 24, banned)
        tokens.append(t), logprobs.append(lp), prompts.append(inputs["input_ids"][0].tolist())
    return tokens, logprobs, prompts


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def test_colocated_rollout_tp2_and_data_parallel_groups(tiny_vl_dir, processor, tmp_path):
    from megatron_vgpo.rollout.vllm_engine import VISION_SPECIAL_TOKENS

    out = tmp_path / "results.json"
    run_torchrun(WORKER, 2, tiny_vl_dir, out, timeout=600)
    got = json.loads(out.read_text())
    banned = processor.tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))

    # Two rollout groups (TP=1 each) split 3 requests 2 + 1 and gather them back in order.
    assert got["dp_split_equals_whole"]
    assert got["dp_request_index"] == [0, 0, 1, 1, 2, 2]

    model = load_hf_model(tiny_vl_dir)
    tokens, logprobs, prompts = hf_references(model, processor, banned)
    assert got["tp2_prompts"] == prompts
    assert got["tp2_greedy"] == tokens
    assert max_gap(got["tp2_logprobs"], logprobs) < 1e-4

    new_tokens, new_logprobs, _ = hf_references(perturbed(model, PERTURBED), processor, banned)
    assert new_tokens != tokens
    assert got["tp2_greedy_after_update"] == new_tokens
    assert max_gap(got["tp2_logprobs_after_update"], new_logprobs) < 1e-4
    print(f"TP2 engine build {got['tp2_build_seconds']:.1f} s; max |logp TP2 - HF| = "
          f"{max_gap(got['tp2_logprobs'], logprobs):.2e} (after update {max_gap(got['tp2_logprobs_after_update'], new_logprobs):.2e})")

    assert got["mismatch"] == pytest.approx([8 / 5, 2.0, 5.0])
