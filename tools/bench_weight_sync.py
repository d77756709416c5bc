"""Throughput of the Megatron -> HF weight resharding (``megatron_vgpo.rollout.weight_sync``) against a
plain in-memory copy of the same bytes, on a full-size random Qwen2.5-VL; and the shard-to-shard path
(rollout TP = trainer TP) against it: time and bytes moved per rank.

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

Then, per layout, the paths side by side, each stream consumed and dropped as above: ``full`` (the
transport picked for the machine: shared memory on one CPU host), ``full-coll`` (the collectives,
what GPUs use; CPU only, where it differs) and ``shard`` (``engine_weights`` with rollout TP = trainer
TP: full-shaped carriers holding this rank's regions). For every rank: the bytes it received and sent
through the transport (``WeightResharder.traffic``) next to the formula (``formula``), and the time
ratio to the ``full`` path (to ``full-coll`` in brackets).
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


def formula(sync) -> dict[str, tuple[int, int]]:
    """``{path: (sent, received)}``: the bytes this rank moves per sync, from the parameter shapes.

    full (collectives): on the owning stage, each TP-partitioned parameter is all-gathered (this rank
    sends its shard to each TP peer and receives theirs: (TP-1)/TP of the full tensor), and the whole
    bucket is broadcast to the other PP-1 stages; another stage's rank receives every full tensor.
    full (shared memory): a rank writes its shards (and its share of the replicated parameters) and
    reads the rest of the bucket. shard: a rank receives, from the owning stage's rank with its TP
    rank, its own region of each HF tensor (``vllm_region``: 1/TP of a split tensor, a norm whole),
    and sends its regions of its own stage's tensors to the other PP-1 stages; a vocabulary that does
    not line up with vLLM's (not the released ones) is all-gathered on its stage first."""
    import math

    from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm
    from megatron_vgpo.rollout.transport import SharedMemoryTransport, _writers
    from megatron_vgpo.rollout.shard_sync import vllm_region, vocab_aligned

    g, arch = sync.groups, sync.arch
    full, shm, shard = [0, 0], [0, 0], [0, 0]
    on_shm = isinstance(sync.transport, SharedMemoryTransport)
    for bucket in sync.buckets:
        writers = _writers(bucket.entries, g.tp_size) if on_shm else {}
        for e in bucket.entries:
            size = e.dtype.itemsize
            full_bytes, shard_bytes = e.numel * size, math.prod(e.shard_shape) * size
            meta = torch.empty(e.full_shape, dtype=e.dtype, device="meta")
            region = sum(math.prod(vllm_region(n, tuple(t.shape), g.tp_rank, g.tp_size).shape(tuple(t.shape))) * size
                         for n, t in nm.megatron_to_hf([(e.name, meta)], arch))
            gathered = e.rows > 1 and e.name in (nm.EMBEDDING, nm.OUTPUT) and not vocab_aligned(arch)
            tp_share = (e.rows - 1) * shard_bytes
            moved = g.pp_size > 1 or e.rows > 1
            if e.stage == g.pp_rank:
                full[0] += tp_share + (g.pp_size - 1) * full_bytes
                full[1] += tp_share
                written = shard_bytes if e.rows > 1 else full_bytes * (writers.get(e.name) == g.tp_rank)
                shm[0] += written * moved
                shm[1] += (full_bytes - written) * moved
                shard[0] += (g.pp_size - 1) * region + tp_share * gathered
                shard[1] += tp_share * gathered
            else:
                full[1] += full_bytes
                shm[1] += full_bytes
                shard[1] += region
    return {"full-coll": tuple(full), "full": tuple(shm if on_shm else full), "shard": tuple(shard)}


def stream_seconds(stream) -> tuple[float, int, int]:
    """Time to consume ``stream`` on every rank (all in step), HF bytes delivered, the largest tensor."""
    import torch.distributed as dist

    dist.barrier()
    start = time.perf_counter()
    delivered = largest = 0
    for _, tensor in stream:
        delivered += tensor.numel() * tensor.element_size()
        largest = max(largest, tensor.numel() * tensor.element_size())
        del tensor
    dist.barrier()
    return time.perf_counter() - start, delivered, largest


def compare_paths(chunks, groups, bucket: int, golden_s: float, golden) -> dict:
    """Time and traffic of each path on this rank (see the module docstring)."""
    from megatron_vgpo.rollout.transport import CollectiveTransport
    from megatron_vgpo.rollout.weight_sync import WeightResharder

    syncs = {"full": golden}
    if not isinstance(golden.transport, CollectiveTransport):
        syncs["full-coll"] = WeightResharder(chunks, groups, bucket_bytes=bucket)
        syncs["full-coll"].transport = CollectiveTransport(groups, groups.device)
    syncs["shard"] = WeightResharder(chunks, groups, bucket_bytes=bucket, rollout_tp=groups.tp_size)
    expected = formula(golden)
    out = {}
    for path, sync in syncs.items():
        seconds = golden_s if path == "full" else stream_seconds(sync.engine_weights())[0]
        out[path] = dict(seconds=seconds, sent=sync.traffic.sent, received=sync.traffic.received,
                         formula_sent=expected[path][0], formula_received=expected[path][1])
    return out


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
    sync_s, delivered, largest = stream_seconds(sync.hf_weights())

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
    del src, dst
    paths = compare_paths(chunks, groups, bucket, sync_s, sync)
    per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, dict(groups=groups.describe(), paths=paths))
    if groups.rank == 0:
        print("RESULT " + json.dumps(dict(layout=f"{args.tp}x{args.pp}", delivered=delivered, sync_s=sync_s,
                                          copy_s=copy_s, fresh_s=fresh_s, buckets=len(sync.buckets),
                                          transport=type(sync.transport).__name__, largest=largest,
                                          ranks=per_rank)), flush=True)
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
    transports, results = set(), []
    for layout in args.layouts:
        tp, pp = map(int, layout.split("x"))
        r = run_layout(args, tp, pp)
        results.append(r)
        gb = r["delivered"] / 1e9
        transports.add(r["transport"])
        print(f"{layout:>6} {gb:8.2f} {r['buckets']:8d} {r['sync_s']:8.2f} {gb / r['sync_s']:10.2f} "
              f"{gb / r['copy_s']:10.2f} {r['sync_s'] / r['copy_s']:6.2f} {gb / r['fresh_s']:11.2f} "
              f"{r['sync_s'] / r['fresh_s']:6.2f}", flush=True)
    print(f"transport(s) used: {', '.join(sorted(transports))} (TP = PP = 1 moves nothing: the parameters "
          f"themselves are streamed)")
    print_paths(results)


def print_paths(results: list[dict]) -> None:
    print("\npaths per rank (rollout TP = trainer TP): GB received / sent through the transport, measured "
          "(formula), sync s, time ratio to full (to full-coll)")
    for r in results:
        for rank in r["ranks"]:
            paths = rank["paths"]
            for path, p in paths.items():
                ratio = p["seconds"] / paths["full"]["seconds"]
                coll = f" ({p['seconds'] / paths['full-coll']['seconds']:.2f})" if "full-coll" in paths else ""
                gb = {k: p[k] / 1e9 for k in ("received", "formula_received", "sent", "formula_sent")}
                print(f"{r['layout']:>6} {rank['groups']:<38} {path:<9} recv {gb['received']:7.3f} "
                      f"({gb['formula_received']:7.3f})  sent {gb['sent']:7.3f} ({gb['formula_sent']:7.3f})"
                      f"  {p['seconds']:7.2f} s  x{ratio:.2f}{coll}", flush=True)


if __name__ == "__main__":
    main()
