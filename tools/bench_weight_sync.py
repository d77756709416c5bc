"""Throughput of the Megatron -> HF weight resharding (``megatron_vgpo.rollout.weight_sync``) against a
plain in-memory copy of the same bytes, on a full-size random Qwen2.5-VL.

    python tools/bench_weight_sync.py [--preset 3b|7b|small] [--bucket-mb 256] [--layouts 1x1 2x1 1x2 2x2]

For each trainer layout TPxPP it launches ``torchrun --nproc-per-node TP*PP`` (gloo on CPU, nccl on
GPU) running this file with ``--worker``: every rank builds its Megatron chunk of the model (real
Qwen2.5-VL shapes, text and vision, bf16, weights left uninitialised: only bytes move), then

- streams the whole model once through ``WeightResharder.hf_weights()`` (every rank receives every
  HF tensor, as the colocated engines need) and drops each tensor: ``sync`` time;
- copies the same number of bytes with ``Tensor.copy_`` in bucket-sized pieces, all ranks at once
  (the same contention), into one reused buffer (``copy``: memory bandwidth) and into fresh memory
  (``fresh``: allocation and first-touch page faults included, what ``clone()`` costs).

Throughput is HF bytes delivered per rank per second; ``ratio`` = sync time / copy time (target on
CPU: <= 3), then sync time / fresh time. The vLLM reload itself is not included (an engine of this size per rank does not fit
here); its cost is vLLM's own load path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def worker(args) -> None:
    import torch.distributed as dist

    from bench_conversion import build_config
    from megatron_vgpo.config.schema import ModelConfig, ParallelConfig
    from megatron_vgpo.distributed import destroy_parallel, init_parallel
    from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
    from megatron_vgpo.rollout.weight_sync import WeightResharder

    groups = init_parallel(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp))
    _, hf_config, _ = build_config(args.preset)
    chunks = build_policy(hf_config, ModelConfig(params_dtype="bfloat16", attention_backend="local"), groups,
                          perform_initialization=False)
    bucket = args.bucket_mb << 20
    sync = WeightResharder(chunks, groups, bucket_bytes=bucket)
    dist.barrier()
    start = time.perf_counter()
    delivered = largest = 0
    for _, tensor in sync.hf_weights():
        delivered += tensor.numel() * tensor.element_size()
        largest = max(largest, tensor.numel() * tensor.element_size())
        del tensor
    dist.barrier()
    sync_s = time.perf_counter() - start

    src = torch.empty(bucket, dtype=torch.uint8, device=groups.device).random_()
    dst = torch.empty_like(src)
    dist.barrier()
    start = time.perf_counter()
    left = delivered
    while left > 0:
        n = min(left, bucket)
        dst[:n].copy_(src[:n])
        left -= n
    dist.barrier()
    copy_s = time.perf_counter() - start
    dist.barrier()
    start = time.perf_counter()
    left = delivered
    while left > 0:  # the same bytes into fresh memory (allocation and first-touch page faults included)
        n = min(left, bucket)
        torch.empty(n, dtype=torch.uint8, device=groups.device).copy_(src[:n])
        left -= n
    dist.barrier()
    fresh_s = time.perf_counter() - start
    if groups.rank == 0:
        print("RESULT " + json.dumps(dict(layout=f"{args.tp}x{args.pp}", delivered=delivered, sync_s=sync_s,
                                          copy_s=copy_s, fresh_s=fresh_s, buckets=len(sync.buckets),
                                          transport=type(sync.transport).__name__, largest=largest)), flush=True)
    destroy_parallel()


def run_layout(args, tp: int, pp: int) -> dict:
    from megatron_vgpo.distributed.parallel import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={tp * pp}", f"--master-port={free_port()}",
           __file__, "--worker", "--tp", str(tp), "--pp", str(pp), "--preset", args.preset,
           "--bucket-mb", str(args.bucket_mb)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"layout {tp}x{pp} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="3b", choices=("small", "3b", "7b"))
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2", "2x2"], help="trainer TPxPP layouts")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--tp", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--pp", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    print(f"preset {args.preset}, bucket {args.bucket_mb} MiB, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'TPxPP':>6} {'GB/rank':>8} {'buckets':>8} {'sync s':>8} {'sync GB/s':>10} {'copy GB/s':>10} "
          f"{'ratio':>6} {'fresh GB/s':>11} {'ratio':>6}")
    transports = set()
    for layout in args.layouts:
        tp, pp = map(int, layout.split("x"))
        r = run_layout(args, tp, pp)
        gb = r["delivered"] / 1e9
        transports.add(r["transport"])
        print(f"{layout:>6} {gb:8.2f} {r['buckets']:8d} {r['sync_s']:8.2f} {gb / r['sync_s']:10.2f} "
              f"{gb / r['copy_s']:10.2f} {r['sync_s'] / r['copy_s']:6.2f} {gb / r['fresh_s']:11.2f} "
              f"{r['sync_s'] / r['fresh_s']:6.2f}", flush=True)
    print(f"transport(s) used: {', '.join(sorted(transports))} (TP = PP = 1 moves nothing: the parameters "
          f"themselves are streamed)")


if __name__ == "__main__":
    main()
