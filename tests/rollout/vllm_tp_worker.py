"""torchrun worker of ``test_vllm_distributed.py``: colocated SPMD engines on 2 ranks (gloo, CPU).

    torchrun --nproc-per-node 2 vllm_tp_worker.py MODEL_DIR OUT_JSON

The ranks first form the trainer's world (``init_parallel``, Megatron TP=2), as a training run does;
then, in that world:
1. rollout TP=1: two rollout groups split the requests (``generate_data_parallel``); the gathered
   batch must equal what one engine generates for all requests alone (same seeds);
2. rollout TP=2 (one group spanning both ranks): greedy rollouts, then ``update_weights`` with the
   perturbed model (every rank passes full HF tensors; vLLM keeps its shard) and greedy again;
3. the mismatch metric's all-reduce over the two ranks.
Rank 0 writes the results as JSON; the test compares them with Hugging Face.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from megatron_vgpo.config.schema import ParallelConfig, RolloutConfig
from megatron_vgpo.distributed import destroy_parallel, init_parallel
from megatron_vgpo.rollout import (
    RolloutGroups, RolloutRequest, SamplingParams, generate_data_parallel, logprob_mismatch,
)
from megatron_vgpo.rollout.vllm_engine import VLLMRolloutEngine
from tests.rollout.conftest import (
    QUESTION, chat_prompt, hf_state_dict, load_hf_model, perturbed, random_image,
)
from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor

GREEDY = SamplingParams(n=1, max_tokens=24, temperature=0.0)
SAMPLED = SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=11)
PERTURBED = ("visual.", "layers.1.self_attn", "layers.2.mlp")


def requests(processor) -> list[RolloutRequest]:
    """Three prompts: one image, text only, another image (uneven split over two groups)."""
    out = []
    for k, num_images in enumerate((1, 0, 1)):
        ids = processor.tokenizer(chat_prompt(processor, f"{QUESTION} ({k})", num_images))["input_ids"]
        out.append(RolloutRequest(ids, [random_image(seed=k)] * num_images))
    return out


def engine(model_dir: str, tp: int) -> VLLMRolloutEngine:
    config = RolloutConfig(tensor_model_parallel_size=tp, max_prompt_length=256, max_response_length=64,
                           kv_cache_memory_bytes=64 << 20, enforce_eager=True, enable_sleep_mode=False)
    return VLLMRolloutEngine(config, model_dir, dtype="float32")


def main(model_dir: str, out_path: str) -> None:
    init_parallel(ParallelConfig(tensor_model_parallel_size=2, backend="gloo"))
    rank = dist.get_rank()
    processor = load_processor(model_dir)
    reqs = requests(processor)
    results = {}

    eng = engine(model_dir, tp=1)
    groups = RolloutGroups.current(tp_size=1)
    assert (groups.dp_size, groups.dp_rank) == (2, rank)
    split = generate_data_parallel(eng, reqs, SAMPLED, groups)
    whole = eng.generate(reqs, SAMPLED)
    results["dp_split_equals_whole"] = (split.response_token_ids == whole.response_token_ids
                                        and split.request_index == whole.request_index)
    results["dp_request_index"] = split.request_index
    eng.shutdown()

    eng = engine(model_dir, tp=2)
    groups = RolloutGroups.current(tp_size=2)
    assert (groups.dp_size, groups.tp_rank) == (1, rank)
    results["tp2_build_seconds"] = eng.build_seconds
    batch = generate_data_parallel(eng, reqs, GREEDY, groups)
    results["tp2_greedy"] = batch.response_token_ids
    results["tp2_logprobs"] = batch.response_logprobs
    results["tp2_prompts"] = batch.prompt_token_ids
    new_model = perturbed(load_hf_model(model_dir), PERTURBED)
    eng.update_weights(hf_state_dict(new_model).items())
    batch = generate_data_parallel(eng, reqs, GREEDY, groups)
    results["tp2_greedy_after_update"] = batch.response_token_ids
    results["tp2_logprobs_after_update"] = batch.response_logprobs
    eng.shutdown()

    # Rank r holds differences r + 1 on 2 + r tokens: totals are 1*2 + 2*3 = 8 over 5 tokens, max 2.
    diff = torch.zeros(1, 4)
    mask = torch.arange(4).unsqueeze(0) < 2 + rank
    mismatch = logprob_mismatch(diff + rank + 1, diff, mask).all_reduce()
    results["mismatch"] = [mismatch.mean, float(mismatch.abs_diff_max), float(mismatch.num_tokens)]

    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
