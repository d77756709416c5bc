"""torchrun worker of ``test_weight_sync_shards.py``: Megatron TP2 x PP2 -> engine TP2 shard to shard, 4 ranks, gloo.

    torchrun --nproc-per-node 4 shard_sync_worker.py MODEL_DIR OUT_DIR stream[,engine[,sync]]

``stream``: the path each rollout TP gets (TP2: shard to shard, TP1: full tensors); the shard stream
against the checkpoint, region by region (``vllm_region``), on every rank; the bytes each rank sent
and received on both paths against the formulas (``formula``); the rollout-TP1 fallback streams the
checkpoint's full tensors.

``engine``: a vLLM TP2 engine with random ("dummy") weights is filled shard to shard, its tensors
copied and greedy rollouts taken, then it is refilled with full tensors (the golden path) and the
same again: the two copies must be identical tensor by tensor, on every rank.

``sync``: ``weight_sync_worker.sync_checks`` (``test_weight_sync_distributed.py``: the resharded
stream on both transports, vLLM TP1 and TP2 engines filled and following a training-like update);
last, since it changes the weights.

Every rank writes ``OUT_DIR/rank{r}.json``: mode -> its results (one launch runs them all: a 4-rank
launch costs more than any of them).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_vgpo.distributed import destroy_parallel
from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm
from megatron_vgpo.rollout.transport import CollectiveTransport
from megatron_vgpo.rollout.shard_sync import vllm_region, vocab_aligned
from megatron_vgpo.rollout.weight_sync import WeightResharder
from tests.rollout.transport_worker import BUCKET_BYTES, tp2_pp2_policy
from tests.rollout.weight_sync_worker import sync_checks


def formula(sync: WeightResharder) -> dict[str, dict[str, int]]:
    """Bytes this rank sends and receives per sync, from the parameter shapes alone.

    Full path (collective transport): the owning stage all-gathers each TP-partitioned parameter (each
    rank sends its shard to, and receives one from, each TP peer) and broadcasts the full bucket to
    the other stages. Shard to shard: the owning stage's rank with this TP rank sends this rank's
    region of each HF tensor (``vllm_region``) to the other stages; a vocabulary that does not line
    up with vLLM's is all-gathered over TP on its stage first."""
    g, arch = sync.groups, sync.arch
    out = {"full": {"sent": 0, "received": 0}, "shard": {"sent": 0, "received": 0}}
    for e in (e for b in sync.buckets for e in b.entries):
        size = e.dtype.itemsize
        full_bytes, shard_bytes = e.numel * size, math.prod(e.shard_shape) * size
        meta = torch.empty(e.full_shape, dtype=e.dtype, device="meta")
        region_bytes = sum(math.prod(vllm_region(n, tuple(t.shape), g.tp_rank, g.tp_size).shape(tuple(t.shape))) * size
                           for n, t in nm.megatron_to_hf([(e.name, meta)], arch))
        gathered = e.rows > 1 and e.name in (nm.EMBEDDING, nm.OUTPUT) and not vocab_aligned(arch)
        if e.stage == g.pp_rank:
            tp_share = (e.rows - 1) * shard_bytes
            out["full"]["sent"] += tp_share + (g.pp_size - 1) * full_bytes
            out["full"]["received"] += tp_share
            out["shard"]["sent"] += (g.pp_size - 1) * region_bytes + (tp_share if gathered else 0)
            out["shard"]["received"] += tp_share if gathered else 0
        else:
            out["full"]["received"] += full_bytes
            out["shard"]["received"] += region_bytes
    return out


def checkpoint(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {nm.canonical_hf_name(k): v for k, v in load_file(Path(model_dir) / "model.safetensors").items()}


def stream_checks(chunks, groups, model_dir: str) -> dict:
    ref = checkpoint(model_dir)
    shard = WeightResharder(chunks, groups, bucket_bytes=BUCKET_BYTES, rollout_tp=2)
    fallback = WeightResharder(chunks, groups, bucket_bytes=BUCKET_BYTES, rollout_tp=1)
    full = WeightResharder(chunks, groups, bucket_bytes=BUCKET_BYTES)
    full.transport = CollectiveTransport(groups, torch.device("cpu"))  # the formula's (and GPUs') transport
    results = {"paths": {"rollout_tp2": "full" if shard.shards is None else "shard",
                         "rollout_tp1": "full" if fallback.shards is None else "shard"}}
    exact, names = True, []
    for name, tensor in shard.engine_weights():
        region = vllm_region(name, tuple(ref[name].shape), groups.tp_rank, groups.tp_size)
        exact &= tuple(tensor.shape) == tuple(ref[name].shape) and torch.equal(region.of(tensor), region.of(ref[name]))
        names.append(name)
    results.update(regions_exact=exact, names_complete=sorted(names) == sorted(ref))
    results["fallback_equals_full"] = all(torch.equal(t, ref[n]) for n, t in fallback.engine_weights())
    for _ in full.hf_weights():
        pass
    expected = formula(shard)
    for path, sync in (("shard", shard), ("full", full)):
        results[path] = {"sent": sync.traffic.sent, "received": sync.traffic.received,
                         "formula_sent": expected[path]["sent"], "formula_received": expected[path]["received"]}
    return results


def _engine_tensors(worker) -> dict[str, torch.Tensor]:
    """Runs on the vLLM worker (this process): a copy of every tensor of the loaded model."""
    return {n: t.detach().clone() for n, t in worker.model_runner.get_model().state_dict().items()}


def engine_checks(chunks, groups, model_dir: str) -> dict:
    from megatron_vgpo.config.schema import RolloutConfig
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor
    from megatron_vgpo.rollout import RolloutGroups, generate_data_parallel
    from megatron_vgpo.rollout.vllm_engine import VLLMRolloutEngine
    from tests.rollout.vllm_tp_worker import requests
    from tests.rollout.weight_sync_worker import GREEDY

    config = RolloutConfig(tensor_model_parallel_size=2, max_prompt_length=256, max_response_length=64,
                           kv_cache_memory_bytes=64 << 20, enforce_eager=True, enable_sleep_mode=False)
    engine = VLLMRolloutEngine(config, model_dir, dtype="float32", load_format="dummy")
    rollout_groups, reqs = RolloutGroups.current(2), requests(load_processor(model_dir))
    shard = WeightResharder(chunks, groups, bucket_bytes=BUCKET_BYTES, rollout_tp=2)
    full = WeightResharder(chunks, groups, bucket_bytes=BUCKET_BYTES)
    results, copies = {}, {}
    dummy = engine._llm.collective_rpc(_engine_tensors)[0]
    for path, stream in (("shard", shard.engine_weights), ("full", full.hf_weights)):
        start = time.perf_counter()
        engine.update_weights(stream())
        results[f"seconds_{path}"] = time.perf_counter() - start
        copies[path] = engine._llm.collective_rpc(_engine_tensors)[0]
        results[f"greedy_{path}"] = generate_data_parallel(engine, reqs, GREEDY, rollout_groups).response_token_ids
    engine.shutdown()
    a, b = copies["shard"], copies["full"]
    results["engine_tensors"] = len(a)
    results["engine_mismatch"] = sorted(set(a) ^ set(b)) + [n for n in a if n in b and not torch.equal(a[n], b[n])]
    results["changed_from_dummy"] = any(not torch.equal(dummy[n], b[n]) for n in b)
    return results


def main(model_dir: str, out_dir: str, modes: str) -> None:
    chunks, groups = tp2_pp2_policy(model_dir)
    checks = {"stream": stream_checks, "engine": engine_checks, "sync": sync_checks}
    assert "sync" not in modes.split(",")[:-1], "sync changes the weights: it runs last"
    results = {mode: checks[mode](chunks, groups, model_dir) for mode in modes.split(",")}
    (Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:4])
