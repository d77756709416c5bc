"""The checks of ``test_weight_sync_distributed.py``: Megatron TP2 x PP2 -> vLLM, 4 ranks, gloo. They run
in ``shard_sync_worker.py``'s launch (mode ``sync``, last: it changes the weights), which builds the
same TP2 x PP2 policy; a 4-rank launch costs more than these checks.

1. ``transport_worker.check_stream``: the resharded stream equals the checkpoint's tensors exactly on
   every rank; one transport allocation (here shared memory: one host, gloo) per sync, reused by
   every bucket, within the size limit, released at the end; a consumer holding its current tensor
   while asking for the next never sees it overwritten; shared-memory tensors are read in place and
   outlive the next bucket. The same with the collective transport (GPU clusters), run on gloo.
2. For rollout TP1 (4 rollout groups) and TP2 (2 groups): a vLLM engine built with random ("dummy")
   weights is filled by the resharder and generates greedily.
3. Rollout TP2 only: a training-like elementwise update of the Megatron weights, a resync, greedy
   generation again, and the trainer's log-probs of those rollouts from the Megatron pipeline
   (forward only); the mismatch metric is taken on the last stage.
``sync_checks`` returns each rank's results; the test compares them with Hugging Face.
"""

from __future__ import annotations

import torch

from megatron_vgpo.config.schema import RolloutConfig
from megatron_vgpo.models.qwen2_5_vl.pipeline import PolicyBatch, run_pipeline
from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor
from megatron_vgpo.rollout import RolloutGroups, SamplingParams, generate_data_parallel, logprob_mismatch
from megatron_vgpo.rollout.vllm_engine import VLLMRolloutEngine
from megatron_vgpo.rollout.transport import CollectiveTransport
from megatron_vgpo.rollout.weight_sync import WeightResharder
from tests.rollout.transport_worker import BUCKET_BYTES, check_stream
from tests.rollout.vllm_tp_worker import requests

GREEDY = SamplingParams(n=1, max_tokens=24, temperature=0.0)


def training_like_update(tensor: torch.Tensor) -> torch.Tensor:
    """An elementwise change (the same on TP shards, replicas and the HF tensors), in place."""
    return tensor.add_(0.05 * torch.sin(1000.0 * tensor))


def trainer_logprobs(chunks, groups, processor, reqs, batch) -> list:
    """Log-probs of each rollout's response from the Megatron pipeline (last stage; [] elsewhere)."""
    micro = []
    for r, request in enumerate(reqs):
        pixels = processor.image_processor(images=request.images, return_tensors="pt") if request.images else {}
        ids = torch.tensor([batch.prompt_token_ids[r] + batch.response_token_ids[r]])
        micro.append(PolicyBatch(ids, torch.ones_like(ids), pixels.get("pixel_values"), pixels.get("image_grid_thw")))

    def keep(b, out):
        return out.logprobs.sum() * 0, torch.tensor(1), out.logprobs.detach()

    with torch.no_grad():
        outputs = run_pipeline(chunks, micro, keep, forward_only=True, return_hidden_states=False)
    result = []
    for r, logprobs in enumerate(outputs):
        n = len(batch.prompt_token_ids[r])
        result.append(logprobs[0, n - 1: n - 1 + len(batch.response_token_ids[r])].tolist())
    return result


def sync_checks(chunks, groups, model_dir: str) -> dict:
    for chunk in chunks:
        chunk.eval()
    sync = WeightResharder(chunks, groups, bucket_bytes=BUCKET_BYTES)
    results = {"stream": check_stream(sync, model_dir), "bucket_bytes": BUCKET_BYTES}
    # The transport of GPU clusters (and of several hosts), here with gloo: the same stream.
    collective = WeightResharder(chunks, groups, bucket_bytes=BUCKET_BYTES)
    collective.transport = CollectiveTransport(groups, torch.device("cpu"))
    results["stream_collective"] = check_stream(collective, model_dir)
    processor = load_processor(model_dir)
    reqs = requests(processor)

    for rollout_tp in (1, 2):
        config = RolloutConfig(tensor_model_parallel_size=rollout_tp, max_prompt_length=256, max_response_length=64,
                               kv_cache_memory_bytes=64 << 20, enforce_eager=True, enable_sleep_mode=False)
        engine = VLLMRolloutEngine(config, model_dir, dtype="float32", load_format="dummy")
        rollout_groups = RolloutGroups.current(rollout_tp)
        engine.update_weights(sync.hf_weights())
        batch = generate_data_parallel(engine, reqs, GREEDY, rollout_groups)
        results[f"rollout_tp{rollout_tp}"] = {"greedy": batch.response_token_ids, "logprobs": batch.response_logprobs}
        if rollout_tp == 2:
            with torch.no_grad():
                for chunk in chunks:
                    for param in chunk.parameters():
                        training_like_update(param)
            engine.update_weights(sync.hf_weights())
            batch = generate_data_parallel(engine, reqs, GREEDY, rollout_groups)
            results["after_update"] = {"greedy": batch.response_token_ids, "logprobs": batch.response_logprobs}
            trainer = trainer_logprobs(chunks, groups, processor, reqs, batch)
            if groups.is_last_stage:
                _, rollout, mask = batch.padded()
                padded = torch.zeros_like(rollout)
                for r, row in enumerate(trainer):
                    padded[r, :len(row)] = torch.tensor(row)
                m = logprob_mismatch(rollout, padded, mask)
                results["mismatch"] = {"mean": m.mean, "max": float(m.abs_diff_max), "tokens": float(m.num_tokens)}
        engine.shutdown()
    return results
