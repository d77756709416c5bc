"""torchrun worker of ``test_seam_parity.py``: VGPO through the plug-in seam against the pre-seam path,
TP2 x PP2 on 4 CPU ranks (gloo), the same weights, batch and seeds.

    torchrun --nproc-per-node 4 tests/training/seam_parity_worker.py MODEL_DIR DATA.parquet OUT_DIR paper,official

Seam: the trainer's own ``compute_logprobs_and_statistics`` / ``compute_advantages`` / ``update`` with
``algorithm.shapers=[vgpo]``. Reference, written as the trainer did it before the seam: a pi_old pass
whose loss function calls ``visual_focus_scores`` on each micro-batch's hidden states, the outcome
advantages over the WHOLE batch indexed by this rank's rows, ``trajectory_weights`` ->
``inter_trajectory_factor`` -> ``combine_advantages``, and the update with the plain DAPO loss. Two
actors from the same weights take one path each. The last stage's ranks write the old log-probs,
focus scores, advantages, the loss metrics and the updated weights of each variant to
``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import random
import sys
import types
from pathlib import Path

import torch
from transformers import AutoConfig

from megatron_vgpo.algorithms.advantages import compute_grpo_outcome_advantages
from megatron_vgpo.algorithms.vgpo import (
    combine_advantages,
    inter_trajectory_factor,
    trajectory_weights,
    visual_focus_scores,
)
from megatron_vgpo.config import load_config
from megatron_vgpo.data import PromptDataset
from megatron_vgpo.distributed import destroy_parallel, init_parallel
from megatron_vgpo.methods import build_methods
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights
from megatron_vgpo.models.qwen2_5_vl.pipeline import run_pipeline
from megatron_vgpo.models.qwen2_5_vl.pixels import PixelSpec
from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor
from megatron_vgpo.trainer import Trainer
from megatron_vgpo.training.actor import Actor, update_metrics
from megatron_vgpo.training.experience import build_experience, scatter_rows, token_aligned
from megatron_vgpo.training.logging import StepTimer
from megatron_vgpo.training.micro_batch import MicroBatches, RowImages
from megatron_vgpo.training.rollout import RolloutStep

REPO = Path(__file__).resolve().parents[2]
N, PROMPTS = 4, 6


def rollout_step(dataset) -> RolloutStep:
    """6 prompts x 4 responses of 3..9 random tokens, rewards in {0, 1} differing within each group."""
    rng = random.Random(0)
    step = RolloutStep()
    for g in range(PROMPTS):
        example = dataset[g]
        for j in range(N):
            length = rng.randint(3, 9)
            step.prompts.append(example)
            step.responses.append([rng.randrange(10, 1000) for _ in range(length)])  # ordinary BPE tokens
            step.response_logprobs.append([-1.0] * length)
            step.group_ids.append(g)
            step.rewards.append(float((j + g) % 2 if j < 3 else rng.random() < 0.5))
        step.group_order.append(g)
    return step


def reference(actor: Actor, cfg, step: RolloutStep, processor, groups) -> dict:
    """The pre-seam trainer's pi_old pass, advantages and update (see the module docstring)."""
    rows, minibatches = step.assignment(cfg.trainer.global_batch_size, groups.dp_rank, groups.dp_size)
    prompts = [step.prompts[r] for r in rows]
    images = RowImages.from_prompts(prompts, PixelSpec.from_processor(processor.image_processor),
                                    load_pixels=groups.is_first_stage)
    tok = processor.tokenizer
    exp = build_experience([p.input_ids for p in prompts], [step.responses[r] for r in rows],
                           [step.response_logprobs[r] for r in rows], [step.group_ids[r] for r in rows],
                           [step.rewards[r] for r in rows], images, pad_token_id=tok.pad_token_id,
                           image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"))
    vgpo = cfg.algorithm.vgpo

    def loss_fn(batch, out):
        rho = visual_focus_scores(out.hidden_states, batch.image_mask, batch.response_mask, vgpo.variant, vgpo.eps)
        extras = {"rows": batch.rows, "logprobs": token_aligned(out.logprobs).float(), "rho": rho}
        return out.logprobs.new_zeros(()), torch.ones((), dtype=torch.int), extras

    for m in actor.model:
        m.eval()
    with torch.no_grad():
        extras = run_pipeline(actor.model, MicroBatches(exp, range(len(exp)), actor.micro_batch_size), loss_fn,
                              forward_only=True, return_hidden_states=True)
    out = {}
    alg = cfg.algorithm
    outcome = compute_grpo_outcome_advantages(torch.tensor(step.rewards), torch.tensor(step.group_ids),
                                              eps=alg.adv_eps, scale_by_std=True)[rows]
    if groups.is_last_stage:
        width = exp.input_ids.shape[1]
        exp.old_logprobs = scatter_rows([(e["rows"], e["logprobs"]) for e in extras], len(exp), width)
        rho = scatter_rows([(e["rows"], e["rho"]) for e in extras], len(exp), width)
        traj = trajectory_weights(rho, exp.response_mask, exp.has_image, vgpo)
        phi = inter_trajectory_factor(traj.s, exp.has_image, exp.group_ids, vgpo)
        exp.advantages = combine_advantages(outcome, traj.psi, phi, exp.response_mask)
        out.update(old_logprobs=exp.old_logprobs, rho=rho, advantages=exp.advantages)
    else:
        exp.old_logprobs = exp.advantages = torch.zeros_like(exp.rollout_logprobs)
    exp.loss_mask, exp.outcome = exp.response_mask, outcome
    stats = actor.update(exp, minibatches, alg)
    out["metrics"] = update_metrics(stats)
    return out


def seam(actor: Actor, cfg, step: RolloutStep, processor, groups) -> dict:
    """The trainer's own methods, on a Trainer assembled around this actor."""
    trainer = Trainer.__new__(Trainer)
    tok = processor.tokenizer
    trainer.cfg, trainer.groups, trainer.actor, trainer.step = cfg, groups, actor, 0
    trainer.methods = build_methods(cfg.algorithm)
    trainer.rollouts = types.SimpleNamespace(
        pixel_spec=PixelSpec.from_processor(processor.image_processor), pad_token_id=tok.pad_token_id,
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), mismatch_metrics=lambda exp, batch: {})
    exp = trainer.compute_logprobs_and_statistics(step, StepTimer())
    trainer.compute_advantages(step, exp)
    out = {}
    if groups.is_last_stage:
        out.update(old_logprobs=exp.old_logprobs, rho=exp.stats[trainer.methods.shapers[0].focus.key],
                   advantages=exp.advantages)
    out["metrics"] = trainer.update(step, exp)
    return out


def load(variant: str):
    return load_config(REPO / "examples" / "configs" / "cpu_tiny.yaml", [
        "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2", "rollout.n=4",
        "trainer.global_batch_size=3", "data.rollout_batch_size=6", "trainer.micro_batch_size=5",
        f"algorithm.vgpo.variant={variant}", "algorithm.shapers=[vgpo]"])


def main(model_dir: str, data_file: str, out_dir: str, variants: str) -> None:
    """``variants``: comma-separated VGPO variants, each compared in this one launch."""
    torch.set_num_threads(1)
    names = variants.split(",")
    first = load(names[0])
    groups = init_parallel(first.parallel, first.trainer.seed)
    processor = load_processor(model_dir)
    dataset = PromptDataset([data_file], first.data, processor, first.rollout.max_prompt_length)
    hf_config = AutoConfig.from_pretrained(model_dir)
    results = {}
    for variant in names:
        cfg = load(variant)
        results[variant] = {}
        for name, path in (("seam", seam), ("reference", reference)):
            chunks = build_policy(hf_config, cfg.model, groups)
            load_hf_weights(chunks, model_dir)
            actor = Actor(chunks, groups, cfg.optimizer, cfg.trainer.micro_batch_size, total_steps=1,
                          steps_per_rl_step=2, device=groups.device)
            results[variant][name] = path(actor, cfg, rollout_step(dataset), processor, groups)
            results[variant][name]["weights"] = {n: p.detach().clone() for n, p in chunks[0].named_parameters()}
    if groups.is_last_stage and groups.tp_rank == 0:
        torch.save(results, Path(out_dir) / f"rank{groups.rank}.pt")
    destroy_parallel()


if __name__ == "__main__":
    main(*sys.argv[1:5])
