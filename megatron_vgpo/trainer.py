"""The VGPO training loop, SPMD on every torchrun rank.

One step: rollout (prompts -> n responses each from the vLLM engine -> rewards -> DAPO dynamic
sampling, refilling) -> the pi_old pass through the Megatron pipeline, whose last stage turns each
micro-batch's hidden states into old log-probs and VGPO focus scores at once -> group advantages and
VGPO shaping (per-trajectory sums gathered over data-parallel ranks) -> PPO mini-batch updates ->
weight sync into the engine -> validation every k steps -> logging -> checkpoint.

Who holds what: every rank holds the rollout batch's token ids and rewards (the engine's
data-parallel groups generate shares and all-gather, rewards are graded on rank 0 and broadcast), so
batch composition and mini-batches are computed identically everywhere; each data-parallel rank
trains on its share of the groups, whole groups only, so group advantages are computed where the
rows are; images are decoded only by the ranks that read them (the generating rollout group, the
first pipeline stage of the training data-parallel rank); log-probs, focus scores, advantages and the
loss live on the last pipeline stage, on the training device.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.distributed as dist

from megatron_vgpo.algorithms.advantages import compute_grpo_outcome_advantages
from megatron_vgpo.algorithms.vgpo import combine_advantages, inter_trajectory_factor, trajectory_weights, vgpo_metrics
from megatron_vgpo.training.actor import update_metrics
from megatron_vgpo.training.experience import build_experience
from megatron_vgpo.training.micro_batch import RowImages
from megatron_vgpo.models.qwen2_5_vl.loading import expected_hf_shapes
from megatron_vgpo.training.format_warmup import format_warmup
from megatron_vgpo.training.logging import StepTimer, flops_per_token, perf_metrics
from megatron_vgpo.training.rollout import RolloutStep, Rollouts

logger = logging.getLogger(__name__)


class Trainer:
    """Build with ``Trainer.from_config(cfg)`` (see ``training/build.py``); run with ``train()``."""

    def __init__(self, cfg, groups, actor, rollouts: Rollouts, metrics_logger, checkpoints, val_set):
        self.cfg, self.groups, self.actor, self.rollouts = cfg, groups, actor, rollouts
        self.metrics_logger, self.checkpoints, self.val_set = metrics_logger, checkpoints, val_set
        self.step = 0
        self.last_metrics: dict = {}

    @classmethod
    def from_config(cls, cfg, engine=None) -> "Trainer":
        """``engine``: a ``RolloutEngine`` to use instead of the vLLM one the config describes."""
        from megatron_vgpo.training.build import build_trainer

        return build_trainer(cls, cfg, engine)

    def train(self) -> dict:
        self.resume()
        if self.step == 0 and self.cfg.trainer.format_warmup.steps:
            format_warmup(self.actor, self.rollouts, self.cfg, self.groups,
                          lambda step, m: self.metrics_logger.log(step, self.from_last_stage(m), progress=False))
            self.rollouts.sync_weights()
        if self.step == 0 and self.cfg.trainer.val_before_train:
            self.log(self.validate())
        while self.step < self.cfg.trainer.total_steps:
            timer = StepTimer()
            with timer("step"):
                batch = timer.time("rollout", self.rollouts.sample, self.step, timer)
                exp = timer.time("logprob", self.compute_logprobs_and_scores, batch)
                adv_metrics = timer.time("advantages", self.compute_advantages, batch, exp)
                update_metrics = timer.time("update", self.update, batch, exp)
                timer.time("weight_sync", self.rollouts.sync_weights)
            self.step += 1
            metrics = {**batch.metrics, **adv_metrics, **update_metrics, **self.perf_metrics(batch, timer),
                       **timer.metrics()}
            if self.cfg.trainer.val_interval and self.step % self.cfg.trainer.val_interval == 0:
                metrics.update(self.validate())
            self.log(metrics)
            self.maybe_save()
        return self.final_summary()

    # ------------------------------------------------------------------------------- the steps

    def compute_logprobs_and_scores(self, batch: RolloutStep):
        """This DP rank's rows -> Experience with old log-probs and focus scores (last stage)."""
        rows, minibatches = batch.assignment(self.cfg.trainer.global_batch_size, self.groups.dp_rank,
                                             self.groups.dp_size)
        prompts = [batch.prompts[r] for r in rows]
        images = RowImages.from_prompts(prompts, self.rollouts.pixel_spec, load_pixels=self.groups.is_first_stage)
        exp = build_experience(
            [p.input_ids for p in prompts], [batch.responses[r] for r in rows],
            [batch.response_logprobs[r] for r in rows], [batch.group_ids[r] for r in rows],
            [batch.rewards[r] for r in rows], images, pad_token_id=self.rollouts.pad_token_id,
            image_token_id=self.rollouts.image_token_id, device=self.groups.device)
        exp.rows, exp.minibatches = rows, minibatches
        vgpo = self.cfg.algorithm.vgpo if self.cfg.algorithm.shaping == "vgpo" else None
        exp.old_logprobs, exp.rho = self.actor.old_logprobs_and_scores(exp, vgpo)
        return exp

    def compute_advantages(self, batch: RolloutStep, exp) -> dict:
        """GRPO outcome advantages over whole groups, then VGPO shaping (last stage only). A data-
        parallel rank holds whole groups (``RolloutStep.assignment``), so both are computed locally."""
        alg = self.cfg.algorithm
        if exp.old_logprobs is None:  # not the last stage: the loss never runs here
            exp.old_logprobs = exp.advantages = torch.zeros_like(exp.rollout_logprobs)
            return {}
        outcome = compute_grpo_outcome_advantages(exp.rewards, exp.group_ids, eps=alg.adv_eps,
                                                  scale_by_std=alg.advantage_estimator == "grpo")
        metrics = {}
        if exp.rho is None:
            exp.advantages = outcome.unsqueeze(-1) * exp.response_mask
        else:
            traj = trajectory_weights(exp.rho, exp.response_mask, exp.has_image, alg.vgpo)
            phi = inter_trajectory_factor(traj.s, exp.has_image, exp.group_ids, alg.vgpo)
            exp.advantages = combine_advantages(outcome, traj.psi, phi, exp.response_mask)
            valid = exp.response_mask & exp.has_image.unsqueeze(-1)
            metrics.update({f"vgpo/{k}": v for k, v in
                            vgpo_metrics(exp.rho * valid, traj, phi, valid, exp.has_image).items()})
        metrics.update(self.rollouts.mismatch_metrics(exp))
        return metrics

    def update(self, batch: RolloutStep, exp) -> dict:
        """PPO epochs over mini-batches of ``global_batch_size`` groups (each DP rank its share)."""
        alg = self.cfg.algorithm
        stats = self.actor.update(exp, [rows for _ in range(alg.ppo_epochs) for rows in exp.minibatches], alg)
        return update_metrics(stats, self.groups.dp_group)

    def validate(self) -> dict:
        if self.val_set is None:
            return {}
        return self.rollouts.validate(self.val_set)

    # ------------------------------------------------------------------ logging, checkpoints, helpers

    def log(self, metrics: dict) -> None:
        metrics = self.from_last_stage(metrics)
        self.metrics_logger.log(self.step, metrics)
        self.last_metrics.update(metrics)

    def maybe_save(self) -> None:
        if self.checkpoints.should_save(self.step, self.cfg.trainer.total_steps):
            with self.actor.optimizer_on_device():
                self.checkpoints.save(self.step, self.actor.model, self.actor.optimizer,
                                      self.actor.scheduler.state_dict(), self.rollouts.state_dict(),
                                      hf_config_dir=self.cfg.model.hf_path)

    def resume(self) -> None:
        with self.actor.optimizer_on_device():
            state = self.checkpoints.resume(self.actor.model, self.actor.optimizer)
        if state is not None:
            self.step = state.step
            self.metrics_logger.resume_at(state.step)  # TensorBoard drops what the killed run logged later
            self.actor.scheduler.load_state_dict(state.scheduler)
            self.rollouts.load_state_dict(state.data)
            self.rollouts.sync_weights()

    def final_summary(self) -> dict:
        self.metrics_logger.close()
        return {k: v for k, v in self.last_metrics.items() if k.startswith("val/")}

    def perf_metrics(self, batch: RolloutStep, timer: StepTimer) -> dict:
        """``perf/tokens_per_s`` over the whole step; ``perf/mfu`` (GPU only) of the Megatron passes:
        the pi_old forward and ``ppo_epochs`` forward-backward passes over the step's tokens, in the
        time of those two sections, on every device of the world."""
        arch = self.actor.chunks[0].hf_config.text_config
        seq_len = batch.num_tokens / max(len(batch.responses), 1)
        fwd = flops_per_token(self.num_params, arch.num_hidden_layers, arch.hidden_size, seq_len, backward=False)
        fwd_bwd = flops_per_token(self.num_params, arch.num_hidden_layers, arch.hidden_size, seq_len)
        flops = batch.num_tokens * (fwd + self.cfg.algorithm.ppo_epochs * fwd_bwd)
        out = perf_metrics(batch.num_tokens, timer.seconds["step"])
        mfu = perf_metrics(batch.num_tokens, timer.seconds["logprob"] + timer.seconds["update"], flops,
                           dist.get_world_size() if dist.is_initialized() else 1)
        if "perf/mfu" in mfu:
            out["perf/mfu"] = mfu["perf/mfu"]
        return out

    @functools.cached_property
    def num_params(self) -> int:
        """Parameters of the whole policy (all stages and TP shards), from its HF config."""
        return sum(math.prod(shape) for shape in expected_hf_shapes(self.actor.chunks[0].hf_config).values())

    def from_last_stage(self, metrics: dict) -> dict:
        """Every rank gets the metrics of the (tp 0, dp 0) rank of the last pipeline stage, merged
        over the keys every rank computed (timings, rollout statistics)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return metrics
        mine = metrics if (self.groups.is_last_stage and self.groups.tp_rank == 0 and self.groups.dp_rank == 0) else None
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        last = next(m for m in gathered if m is not None)
        return {**metrics, **last}
