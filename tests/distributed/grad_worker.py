"""torchrun worker of ``test_gradients.py``: one backward of the DAPO loss, gradients gathered to disk.

    torchrun --nproc-per-node N grad_worker.py --tp T --pp P --out DIR HF_DIR [HF_DIR ...]

For each checkpoint: build and load the policy under TP x PP, run the parity batch as two
micro-batches through Megatron's pipeline schedule (forward + backward) with the DAPO token-mean
loss plus an entropy bonus (so that the vocab-parallel entropy's gradient is exercised too), then
gather every parameter gradient to its full (TP=1) Megatron layout with global layer names and save
``DIR/<checkpoint name>/grads_pp<stage>.pt`` from TP rank 0 of each stage. With tied embeddings the
last stage's output-layer gradient is saved under the embedding's name (the test adds the stages).
Also checks that replicated parameters (norms, vision tower) got identical gradients on all TP ranks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from transformers import AutoConfig

from megatron_vgpo.algorithms.dapo import dapo_policy_loss
from megatron_vgpo.config.schema import ModelConfig, ParallelConfig
from megatron_vgpo.distributed import destroy_parallel, init_parallel
from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
from megatron_vgpo.models.qwen2_5_vl.loading import global_parameter_names, load_hf_weights
from megatron_vgpo.models.qwen2_5_vl.parity import fixed_multimodal_batch, micro_batches
from megatron_vgpo.models.qwen2_5_vl.pipeline import PolicyBatch, run_pipeline

ADVANTAGE_PER_ROW = {0: 1.0, 1: -0.5, 2: 0.75}  # rows of the parity batch
ENTROPY_COEF = 0.01


def loss_inputs(batch, rows):
    """``(advantages [B, L], response_mask [B, L])``: the last 7 targets of each row are the response."""
    mask = batch.target_mask()
    lengths = batch.attention_mask.sum(dim=1, keepdim=True)
    positions = torch.arange(mask.shape[1]).unsqueeze(0)
    response = mask & (positions >= lengths - 8)
    advantages = torch.tensor([ADVANTAGE_PER_ROW[r] for r in rows]).unsqueeze(1).expand_as(mask)
    return advantages, response


@dataclass
class LossBatch(PolicyBatch):
    """Model inputs plus this test's loss inputs (moved to the device with them)."""

    advantages: Optional[torch.Tensor] = None  # [B, L]
    response_mask: Optional[torch.Tensor] = None  # [B, L] bool


def policy_batches(hf_config):
    from megatron_vgpo.models.qwen2_5_vl.parity import MICRO_BATCH_ROWS

    batches = []
    for batch, rows in zip(micro_batches(fixed_multimodal_batch(hf_config)), MICRO_BATCH_ROWS):
        advantages, response = loss_inputs(batch, rows)
        batches.append(LossBatch(batch.input_ids, batch.attention_mask, batch.pixel_values, batch.image_grid_thw,
                                 advantages=advantages, response_mask=response))
    return batches


def dapo_loss(batch: LossBatch, out, num_tokens: int):
    result = dapo_policy_loss(out.logprobs, out.logprobs.detach(), batch.advantages, batch.response_mask, num_tokens,
                              entropy=out.entropy, entropy_coef=ENTROPY_COEF)
    return result.loss, torch.ones((), dtype=torch.int, device=out.logprobs.device), result.loss.detach()


def gathered_grads(chunks, groups) -> tuple[dict, float]:
    """Full gradients by global Megatron name, and the max TP-replica disagreement."""
    grads, replica_gap = {}, 0.0
    for chunk in chunks:
        for name, param in global_parameter_names(chunk):
            grad = param.grad if param.grad is not None else torch.zeros_like(param)
            shards = [torch.empty_like(grad) for _ in range(groups.tp_size)]
            dist.all_gather(shards, grad.contiguous(), group=groups.tp_group)
            if nm.tp_partition(name)[0] is None:
                replica_gap = max(replica_gap, max((s - shards[0]).abs().max().item() for s in shards))
            if name == nm.OUTPUT and chunk.arch.tie_embeddings:
                name = nm.EMBEDDING
            grads[name] = grads.get(name, 0) + nm.unshard(name, shards)
    return grads, replica_gap


def full_gradients(hf_dir, groups) -> tuple[dict, float]:
    """Build, load, one forward/backward; the gathered gradients (see ``gathered_grads``)."""
    hf_config = AutoConfig.from_pretrained(hf_dir)
    chunks = build_policy(hf_config, ModelConfig(params_dtype="float32"), groups)
    load_hf_weights(chunks, hf_dir)
    batches = policy_batches(hf_config)
    num_tokens = int(sum(b.response_mask.sum() for b in batches))
    run_pipeline(chunks, batches, lambda b, out: dapo_loss(b, out, num_tokens), compute_entropy=True,
                 return_hidden_states=False)
    return gathered_grads(chunks, groups)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("hf_dirs", nargs="+")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    groups = init_parallel(ParallelConfig(tensor_model_parallel_size=args.tp, pipeline_model_parallel_size=args.pp))
    # Megatron's default rank order (tp-cp-ep-dp-pp): TP ranks adjacent, PP slowest (here DP = 1).
    assert (groups.tp_rank, groups.pp_rank) == (groups.rank % args.tp, groups.rank // args.tp), groups.describe()
    assert groups.pp_ranks == tuple(groups.tp_rank + args.tp * s for s in range(args.pp)), groups.pp_ranks
    for hf_dir in args.hf_dirs:
        grads, replica_gap = full_gradients(hf_dir, groups)
        assert replica_gap <= 1e-7, f"TP replicas of a replicated parameter disagree by {replica_gap}"
        if groups.tp_rank == 0:
            out = Path(args.out) / Path(hf_dir).name
            out.mkdir(parents=True, exist_ok=True)
            torch.save(grads, out / f"grads_pp{groups.pp_rank}.pt")
        print(f"[grad_worker] rank {groups.rank} {Path(hf_dir).name}: {len(grads)} gradients, "
              f"TP replica gap {replica_gap:.1e}", flush=True)
    destroy_parallel()


if __name__ == "__main__":
    main()
