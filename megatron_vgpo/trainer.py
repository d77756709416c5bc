"""The training loop, SPMD on every torchrun rank; the methods it runs are plug-ins (``methods/``).

One step: rollout (prompts -> n responses each from the vLLM engine -> rewards -> DAPO dynamic
sampling, refilling) -> the pi_old pass through the Megatron pipeline (old log-probs and the
methods' per-token statistics, computed on the last stage inside each micro-batch), plus one
forward-only pass per extra image view the methods need -> group advantages and the configured
shapers -> PPO mini-batch updates (with the configured loss terms) -> weight sync into the engine ->
validation every k steps -> logging -> checkpoint.

Who holds what: every rank holds the rollout batch's token ids and rewards (the engine's
data-parallel groups generate shares and all-gather, rewards are graded on rank 0 and broadcast), so
batch composition and mini-batches are computed identically everywhere; each data-parallel rank
trains on its share of the groups, whole groups only (asserted), so group advantages and every
shaper's per-group reduction are computed where the rows are; images are decoded only by the ranks
that read them (the generating rollout group, the first pipeline stage of the training
data-parallel rank); log-probs, statistics, advantages and the loss live on the last pipeline stage,
on the training device; logged metrics are reduced over data-parallel ranks.
"""

from __future__ import annotations

import functools
import logging
import math

import torch
import torch.distributed as dist

from megatron_vgpo.algorithms.advantages import compute_grpo_outcome_advantages
from megatron_vgpo.methods import Methods, ShapingInputs
from megatron_vgpo.methods.views import view_row_images
from megatron_vgpo.models.qwen2_5_vl.loading import expected_hf_shapes
from megatron_vgpo.training.actor import update_metrics
from megatron_vgpo.training.experience import Experience, build_experience
from megatron_vgpo.training.format_warmup import format_warmup
from megatron_vgpo.training.logging import StepTimer, flops_per_token, perf_metrics
from megatron_vgpo.training.preemption import StopRequest
from megatron_vgpo.training.rollout import RolloutStep, Rollouts

logger = logging.getLogger(__name__)


class Trainer:
    """Build with ``Trainer.from_config(cfg)`` (see ``training/build.py``); run with ``train()``."""

    def __init__(self, cfg, groups, actor, rollouts: Rollouts, methods: Methods, metrics_logger, checkpoints, val_set):
        self.cfg, self.groups, self.actor, self.rollouts, self.methods = cfg, groups, actor, rollouts, methods
        self.metrics_logger, self.checkpoints, self.val_set = metrics_logger, checkpoints, val_set
        self.step = 0
        self.last_metrics: dict = {}

    @classmethod
    def from_config(cls, cfg, engine=None) -> "Trainer":
        """``engine``: a ``RolloutEngine`` to use instead of the vLLM one the config describes."""
        from megatron_vgpo.training.build import build_trainer

        return build_trainer(cls, cfg, engine)

    def train(self) -> dict:
        stop = StopRequest(self.cfg.trainer.stop_signals, self.cfg.checkpoint.save_dir, self.groups.rank,
                           self.groups.device)
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
                exp = timer.time("logprob", self.compute_logprobs_and_statistics, batch, timer)
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
            if self.stopped(stop):
                break
        return self.final_summary()

    # ------------------------------------------------------------------------------- the steps

    def compute_logprobs_and_statistics(self, batch: RolloutStep, timer: StepTimer) -> Experience:
        """This DP rank's rows -> Experience with old log-probs and the methods' statistics (last
        stage): the pass over the original images, then one per extra view (``timing_s/extra_views``)."""
        rows, minibatches = batch.assignment(self.cfg.trainer.global_batch_size, self.groups.dp_rank,
                                             self.groups.dp_size)
        prompts = [batch.prompts[r] for r in rows]
        views = self.methods.views()
        images = self.view_images(views[0], prompts, rows)
        exp = build_experience(
            [p.input_ids for p in prompts], [batch.responses[r] for r in rows],
            [batch.response_logprobs[r] for r in rows], [batch.group_ids[r] for r in rows],
            [batch.rewards[r] for r in rows], images, pad_token_id=self.rollouts.pad_token_id,
            image_token_id=self.rollouts.image_token_id, device=self.groups.device)
        exp.rows, exp.minibatches = rows, minibatches
        exp.old_logprobs, exp.stats = self.actor.forward_statistics(exp, self.methods.statistics(views[0]))
        for view in views[1:]:
            with timer("extra_views"):
                _, stats = self.actor.forward_statistics(exp, self.methods.statistics(view),
                                                         self.view_images(view, prompts, rows), old_logprobs=False)
                exp.stats.update(stats)
        return exp

    def view_images(self, view, prompts, rows):
        """The rows' images under ``view``; pixels only where they are read (the first stage)."""
        return view_row_images(view, prompts, rows, self.rollouts.pixel_spec, seed=self.cfg.trainer.seed,
                               step=self.step, load_pixels=self.groups.is_first_stage)

    def compute_advantages(self, batch: RolloutStep, exp: Experience) -> dict:
        """Group outcome advantages, then the pi_old-phase shapers in order (last stage only). A data-
        parallel rank holds whole groups, so both are computed locally; diagnostics are reduced over
        data-parallel ranks."""
        alg = self.cfg.algorithm
        exp.outcome = compute_grpo_outcome_advantages(exp.rewards, exp.group_ids, eps=alg.adv_eps,
                                                      scale_by_std=alg.advantage_estimator == "grpo")
        if exp.old_logprobs is None:  # not the last stage: the loss never runs here
            exp.old_logprobs = exp.advantages = torch.zeros_like(exp.rollout_logprobs)
            exp.loss_mask = exp.response_mask
            return {}
        result = self.methods.shape(ShapingInputs(
            advantages=exp.outcome.unsqueeze(-1) * exp.response_mask, outcome=exp.outcome,
            response_mask=exp.response_mask, loss_mask=exp.response_mask, group_ids=exp.group_ids,
            has_image=exp.has_image, old_logprobs=exp.old_logprobs, stats=exp.stats, dp_group=self.groups.dp_group,
            minibatches=exp.minibatches, micro_batch_size=self.cfg.trainer.micro_batch_size))
        exp.advantages, exp.loss_mask = result.advantages, result.loss_mask
        return {**result.metrics.reduce(self.groups.dp_group), **self.rollouts.mismatch_metrics(exp, batch)}

    def update(self, batch: RolloutStep, exp: Experience) -> dict:
        """PPO epochs over mini-batches of ``global_batch_size`` groups (each DP rank its share)."""
        alg = self.cfg.algorithm
        stats = self.actor.update(exp, [rows for _ in range(alg.ppo_epochs) for rows in exp.minibatches], alg,
                                  self.methods, step=self.step, total_steps=self.cfg.trainer.total_steps)
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
            self.save()

    def stopped(self, stop: StopRequest) -> bool:
        """After a step: when a stop was requested (any rank), save, clear the request, say so."""
        reason = stop.requested()
        if reason:
            self.save()
            stop.clear()
            logger.warning("stop requested (%s): checkpoint of step %d saved, exiting; the same command resumes "
                           "from it", reason, self.step)
        return reason is not None

    def save(self) -> None:
        with self.actor.optimizer_on_device():
            self.checkpoints.save(self.step, self.actor.model, self.actor.optimizer, self.actor.scheduler.state_dict(),
                                  self.rollouts.state_dict(), hf_config_dir=self.cfg.model.hf_path)

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
