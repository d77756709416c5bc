"""Check that the Megatron Qwen2.5-VL policy computes the same thing as Hugging Face, under a layout.

    torchrun --nproc-per-node $((N*M)) tools/verify_parity.py --hf-dir D --tp N --pp M [--dtype float32]

Loads the HF checkpoint ``D`` into this layout's Megatron chunks (through the name mapping), runs
Megatron's pipeline schedule and HF's ``Qwen2_5_VLForConditionalGeneration`` on the same fixed
multimodal batch (two image sizes, two images in one sample, a text-only sample, right padding, fed
as two micro-batches of different lengths; see ``megatron_vgpo.models.qwen2_5_vl.parity``), and
prints the max absolute difference of the per-token log-probs and of the final hidden states over
every valid position. Exits 1 when either exceeds
``--tol`` (default 1e-5, meant for float32). Several ``--hf-dir`` may be given (checked in turn).
Works on any Qwen2.5-VL directory; the world size must be a multiple of TP x PP (extra ranks are DP
replicas and check the same thing).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.distributed as dist

from megatron_vgpo.config.schema import ModelConfig, ParallelConfig
from megatron_vgpo.distributed import destroy_parallel, init_parallel, layout_string
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights
from megatron_vgpo.models.qwen2_5_vl.parity import compare, fixed_multimodal_batch, hf_reference, micro_batches
from megatron_vgpo.models.qwen2_5_vl.pipeline import PolicyBatch, run_pipeline


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hf-dir", nargs="+", required=True, help="HF Qwen2.5-VL checkpoint directory (or several)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline chunks per rank")
    p.add_argument("--sequence-parallel", action="store_true", help="Megatron sequence parallelism")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--tol", type=float, default=1e-5, help="max allowed absolute difference")
    return p.parse_args(argv)


def megatron_outputs(chunks, batches):
    """Last stage: ``[(logprobs [B, L], hidden [B, L, d])]`` per micro-batch; elsewhere ``[]``."""
    def keep(_, out):
        return out.logprobs.sum() * 0, torch.tensor(1), (out.logprobs, out.hidden_states)

    policy_batches = [PolicyBatch(b.input_ids, b.attention_mask, b.pixel_values, b.image_grid_thw) for b in batches]
    with torch.no_grad():
        return run_pipeline(chunks, policy_batches, keep, forward_only=True)


def check_one(hf_dir: str, args, groups) -> dict:
    """Max diffs on this rank (zeros on ranks without the last stage) and the timings."""
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    dtype = getattr(torch, args.dtype)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    start = time.perf_counter()
    chunks = build_policy(hf_config, ModelConfig(params_dtype=args.dtype, attention_backend="auto"), groups)
    load_hf_weights(chunks, hf_dir)
    loaded = time.perf_counter()
    for chunk in chunks:
        chunk.eval()
    batches = micro_batches(fixed_multimodal_batch(hf_config, dtype=dtype))
    outputs = megatron_outputs(chunks, batches)
    ran = time.perf_counter()
    diffs = {"logprobs": 0.0, "hidden_states": 0.0}
    if outputs:
        hf_model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, dtype=dtype).eval()
        for batch, output in zip(batches, outputs):
            for key, value in compare(batch, *output, *hf_reference(hf_model, batch)).items():
                diffs[key] = max(diffs[key], value)
    return {**diffs, "load_s": loaded - start, "forward_s": ran - loaded}


def main(argv=None) -> int:
    args = parse_args(argv)
    parallel = ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp,
                              virtual_pipeline_model_parallel_size=args.vpp, sequence_parallel=args.sequence_parallel)
    groups = init_parallel(parallel)
    ok = True
    for hf_dir in args.hf_dir:
        result = check_one(hf_dir, args, groups)
        worst = torch.tensor([result["logprobs"], result["hidden_states"]], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        passed = bool(worst.max() <= args.tol)
        ok &= passed
        if groups.rank == 0:
            print(f"[verify_parity] {hf_dir} | {layout_string(parallel, groups.world_size)} | {args.dtype} | "
                  f"max|dlogprob|={worst[0]:.3e} max|dhidden|={worst[1]:.3e} | tol {args.tol:.0e} | "
                  f"load {result['load_s']:.2f}s forward {result['forward_s']:.2f}s | "
                  f"{'PASS' if passed else 'FAIL'}", flush=True)
    destroy_parallel()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
