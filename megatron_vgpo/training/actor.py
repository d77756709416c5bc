"""The policy as the trainer drives it: Megatron DDP chunks, Megatron's optimizer and LR schedule,
the pi_old log-prob pass (which also yields VGPO's focus scores) and the PPO update.

Loss scaling: the policy's ``TransformerConfig`` sets ``calculate_per_token_loss``, so each
micro-batch returns the SUM of its per-token losses and its token count, and Megatron's
``finalize_model_grads`` divides the gradients by the token count summed over micro-batches and
data-parallel ranks: the exact token-mean over the whole mini-batch (DAPO's token-level
aggregation), however uneven the micro-batches.

Hidden states: in the pi_old pass the last pipeline stage turns each micro-batch's final hidden
states into focus scores ``rho`` inside the loss function and drops them; only ``[B, L]`` tensors
leave the micro-batch.

Devices: micro-batches reach the model on ``device`` (the pipeline's forward step moves them), every
tensor the loss functions create is made on the device of the model outputs, and the per-row
results are assembled on that device.

LR schedule: Megatron's ``OptimizerParamScheduler`` counts optimizer steps. A trainer step makes
``steps_per_rl_step = ppo_epochs x rollout_batch_size / global_batch_size`` of them (fewer when
dynamic sampling kept fewer groups), so warmup (configured in trainer steps) and decay are sized in
that unit: the decay reaches ``min_lr`` exactly at the run's last optimizer step. Each update
advances the schedule by exactly ``steps_per_rl_step`` in total, so a step with fewer mini-batches
keeps the schedule aligned with the trainer step (and a resumed run with it).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_vgpo.algorithms.dapo import dapo_policy_loss, finalize_policy_metrics, sum_metric_sums
from megatron_vgpo.methods import LossInputs, Methods, MetricSums, ShapingInputs, TokenStatistic, apply_shapers
from megatron_vgpo.models.qwen2_5_vl.pipeline import run_pipeline
from megatron_vgpo.training.experience import Experience, scatter_rows, token_aligned
from megatron_vgpo.training.micro_batch import MicroBatch, MicroBatches
from megatron_vgpo.training.offload import OptimizerOffloader


def _megatron_optimizer(model: list, opt_cfg, params_dtype: torch.dtype, distributed: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=opt_cfg.lr, min_lr=opt_cfg.min_lr, weight_decay=opt_cfg.weight_decay,
        adam_beta1=opt_cfg.adam_beta1, adam_beta2=opt_cfg.adam_beta2, adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        params_dtype=params_dtype, use_distributed_optimizer=distributed)
    return get_megatron_optimizer(config, model)


def lr_scheduler(optimizer, opt_cfg, total_steps: int, steps_per_rl_step: int):
    """Megatron's LR schedule in optimizer steps for a run of ``total_steps`` trainer steps of
    ``steps_per_rl_step`` optimizer steps each: linear warmup over ``lr_warmup_steps`` trainer
    steps, then ``lr_decay_style`` down to ``min_lr`` at optimizer step ``total x k - 1`` (the last)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = opt_cfg.lr_warmup_steps * steps_per_rl_step
    last = total_steps * steps_per_rl_step - 1
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else opt_cfg.lr, max_lr=opt_cfg.lr, min_lr=opt_cfg.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(last, warmup + 1), lr_decay_style=opt_cfg.lr_decay_style,
        start_wd=opt_cfg.weight_decay, end_wd=opt_cfg.weight_decay, wd_incr_steps=max(last, 1),
        wd_incr_style="constant")


def schedule_increments(num_minibatches: int, steps_per_rl_step: int) -> list[int]:
    """How far each of a step's mini-batches advances the LR schedule: ``steps_per_rl_step`` in total,
    spread as evenly as possible (all ones in a full step)."""
    k, m = steps_per_rl_step, num_minibatches
    return [(j + 1) * k // m - j * k // m for j in range(m)]


@dataclass
class OptimizerStepStats:
    """One optimizer step of an update. ``loss_sums``: the policy loss's (and loss terms') metric
    numerators and the token count, summed over the mini-batch's micro-batches, device tensors on the
    last pipeline stage, empty elsewhere; turned into token means where they are logged."""

    grad_norm: float  # NaN for a skipped step
    lr: float
    skipped: bool = False  # non-finite gradients: no optimizer step
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)  # qualified names ("actor/pg_loss") + num_tokens
    shaping: MetricSums = field(default_factory=MetricSums)  # current-policy shapers' diagnostics


def update_metrics(stats: list[OptimizerStepStats], dp_group=None) -> dict[str, float]:
    """Metrics of an update: grad norm and LR averaged over its optimizer steps; the policy loss's and
    the loss terms' metrics as exact token means over every step's tokens on every data-parallel rank
    (sums all-reduced over ``dp_group``, which holds ranks of one pipeline stage only); the
    current-policy shapers' diagnostics, reduced likewise."""
    import torch.distributed as dist

    if not stats:
        return {}
    applied = [s for s in stats if not s.skipped]
    out = {"actor/grad_norm": sum(s.grad_norm for s in applied) / len(applied) if applied else float("nan"),
           "actor/lr": sum(s.lr for s in stats) / len(stats),
           "actor/skipped_steps": float(len(stats) - len(applied))}
    sums = sum_metric_sums(s.loss_sums for s in stats)
    if sums:
        keys = sorted(sums)
        packed = torch.stack([sums[k].double() for k in keys])
        if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(packed, group=dp_group)
        out.update(finalize_policy_metrics(dict(zip(keys, packed.tolist()))))
    shaping = MetricSums()
    for s in stats:
        shaping.update(s.shaping)
    if shaping.sums or shaping.extrema:
        out.update(shaping.reduce(dp_group))
    return out


class Actor:
    """Owns this rank's policy chunks for training (``chunks`` stay the unwrapped modules)."""

    def __init__(self, chunks: list, groups, opt_cfg, micro_batch_size: int, total_steps: int,
                 steps_per_rl_step: int = 1, device: torch.device | None = None):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

        self.chunks, self.groups, self.micro_batch_size = chunks, groups, micro_batch_size
        self.device = device if device is not None else next(chunks[0].parameters()).device
        self.steps_per_rl_step = steps_per_rl_step
        # The distributed optimizer shards states over DP with CUDA-only buffers: GPU only.
        distributed = opt_cfg.use_distributed_optimizer and self.device.type == "cuda"
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=distributed)
        self.model = [DistributedDataParallel(c.config, ddp_cfg, c) for c in chunks]
        for chunk in chunks:
            chunk.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = _megatron_optimizer(self.model, opt_cfg, chunks[0].config.params_dtype, distributed)
        self.scheduler = lr_scheduler(self.optimizer, opt_cfg, total_steps, steps_per_rl_step)
        self.offloader = OptimizerOffloader(self.optimizer, self.model, self.device, opt_cfg.offload_during_rollout)
        self.max_consecutive_nonfinite, self.consecutive_nonfinite = opt_cfg.max_consecutive_nonfinite, 0

    def offload(self) -> None:
        """Optimizer states and grad buffers to host memory (``optimizer.offload_during_rollout``)."""
        self.offloader.offload()

    def onload(self) -> None:
        """Back on the device, for an update or a checkpoint."""
        self.offloader.onload()

    def gradients_finite(self) -> bool:
        """Whether every gradient of this step is finite on every rank (one scan of the gradient
        buffers, one all-reduce): a NaN/inf loss on the last stage reaches every stage's gradients."""
        import torch.distributed as dist

        finite = torch.ones((), dtype=torch.int32, device=self.device)
        for m in self.model:
            for buffer in m.buffers + m.expert_parallel_buffers:
                finite &= torch.isfinite(buffer.grad_data).all().to(torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def count_nonfinite(self) -> None:
        self.consecutive_nonfinite += 1
        if self.consecutive_nonfinite >= self.max_consecutive_nonfinite:
            raise RuntimeError(f"{self.consecutive_nonfinite} optimizer steps in a row had non-finite (NaN/inf) "
                               f"gradients and were skipped (optimizer.max_consecutive_nonfinite="
                               f"{self.max_consecutive_nonfinite}): the run stops; resume from the last checkpoint "
                               f"with a lower optimizer.lr or look for the bad batch in the logs")

    @contextlib.contextmanager
    def optimizer_on_device(self):
        """The optimizer state on the device inside (checkpoint save / load), as before afterwards."""
        was_offloaded = self.offloader.offloaded
        self.onload()
        try:
            yield
        finally:
            if was_offloaded:
                self.offload()

    @torch.no_grad()
    def forward_statistics(self, exp: Experience, statistics: Sequence[TokenStatistic] = (), images=None,
                           old_logprobs: bool = True) -> tuple[Optional[torch.Tensor], dict[str, torch.Tensor]]:
        """One forward-only pass over all rows (with ``images``, an image view's ``RowImages``, instead of
        the experience's own): ``(old log-probs [B, L] or None, {statistic key: [B, L]})`` on the last
        pipeline stage, on the device; ``(None, {})`` elsewhere. Hidden states and logits stay inside
        each micro-batch."""
        hidden = any(s.needs_hidden_states for s in statistics)
        entropy = any(s.needs_entropy for s in statistics)

        def loss_fn(batch: MicroBatch, out):
            extras = {"rows": batch.rows, **{s.key: s.compute(batch, out) for s in statistics}}
            if old_logprobs:
                extras["logprobs"] = token_aligned(out.logprobs).float()
            return out.logprobs.new_zeros(()), torch.ones((), dtype=torch.int, device=out.logprobs.device), extras

        for m in self.model:
            m.eval()
        batches = MicroBatches(exp, range(len(exp)), self.micro_batch_size, images=images)
        extras = run_pipeline(self.model, batches, loss_fn, forward_only=True, compute_entropy=entropy,
                              return_hidden_states=hidden, device=self.device)
        if not self.groups.is_last_stage:
            return None, {}
        width = exp.input_ids.shape[1]
        keys = [s.key for s in statistics] + (["logprobs"] if old_logprobs else [])
        out = {k: scatter_rows([(e["rows"], e[k]) for e in extras], len(exp), width) for k in keys}
        return out.pop("logprobs", None), out

    def update(self, exp: Experience, minibatch_rows: list[list[int]], alg, methods: Optional[Methods] = None,
               step: int = 0, total_steps: int = 1, lr: float | None = None,
               schedule: bool = True) -> list[OptimizerStepStats]:
        """One optimizer step per mini-batch of local rows. ``methods``: the current-policy shapers and
        the loss terms to apply (``methods/``); ``step``/``total_steps``: the trainer step, for loss
        terms that anneal. ``lr`` overrides the learning rate of these steps; ``schedule=False`` leaves
        the LR schedule where it is (format warm-up). The optimizer state is on the device for the
        update and offloaded after it (when configured)."""
        for m in self.model:
            m.train()
        current = methods.current_shapers if methods is not None else []
        current_stats = methods.current_statistics() if methods is not None else []
        terms = methods.loss_terms if methods is not None else []
        compute_entropy = alg.entropy_coef > 0 or (methods is not None and methods.update_needs_entropy)
        hidden = methods is not None and methods.update_needs_hidden_states
        # The statistics exist (and the loss runs) on the last pipeline stage only.
        stat_keys = methods.loss_statistic_keys() if methods is not None and self.groups.is_last_stage else []

        def loss_fn(batch: MicroBatch, out):
            mask = batch.response_mask
            logprobs = token_aligned(out.logprobs)
            entropy = token_aligned(out.entropy) if out.entropy is not None else None
            advantages, pg_mask, shaping = batch.advantages, batch.loss_mask, None
            if current:  # group-aligned micro-batches: whole groups (validated)
                result = apply_shapers(current, ShapingInputs(
                    advantages, batch.outcome, mask, pg_mask, batch.group_ids, batch.image_mask.any(-1),
                    batch.old_logprobs, {s.key: s.compute(batch, out) for s in current_stats}))
                advantages, pg_mask, shaping = result.advantages, result.loss_mask, result.metrics
            result = dapo_policy_loss(
                logprobs, batch.old_logprobs, advantages, mask,
                global_num_tokens=1.0,  # a SUM: finalize_model_grads divides by the global token count
                clip_ratio_low=alg.clip_ratio_low, clip_ratio_high=alg.clip_ratio_high,
                clip_ratio_c=alg.clip_ratio_c, entropy=entropy, entropy_coef=alg.entropy_coef, pg_mask=pg_mask)
            loss = result.loss
            sums = {(k if k == "num_tokens" else f"actor/{k}"): v for k, v in result.metric_sums.items()}
            for term in terms:
                term_sum, term_metrics = term.loss_sum(LossInputs(logprobs, entropy, mask, batch.stats, step,
                                                                  total_steps))
                loss = loss + term_sum
                sums.update({f"{term.name}/{k}": v for k, v in term_metrics.items()})
            return loss, mask.sum().to(torch.int), {"sums": sums, "shaping": shaping}

        self.onload()
        if lr is None:
            self.scheduler.step(increment=0)  # the schedule's rate (an earlier lr override may have replaced it)
        steps = []
        increments = schedule_increments(len(minibatch_rows), self.steps_per_rl_step)
        for rows, increment in zip(minibatch_rows, increments):
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            if lr is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            batches = MicroBatches(exp, rows, self.micro_batch_size, loss_inputs=True, stat_keys=stat_keys)
            extras = run_pipeline(self.model, batches, loss_fn, compute_entropy=compute_entropy,
                                  return_hidden_states=hidden, device=self.device)
            step_lr = self.optimizer.param_groups[0]["lr"]
            skipped = not self.gradients_finite()
            if skipped:  # NaN/inf loss or gradient: the weights and optimizer state stay as they are
                grad_norm = float("nan")
                self.optimizer.zero_grad()
                self.count_nonfinite()
            else:
                _, grad_norm, _ = self.optimizer.step()
                self.consecutive_nonfinite = 0
            if schedule:
                self.scheduler.step(increment=increment)
            shaping = MetricSums()
            for e in extras:
                if e["shaping"] is not None:
                    shaping.update(e["shaping"])
            steps.append(OptimizerStepStats(grad_norm=float(grad_norm if grad_norm is not None else 0.0), lr=step_lr,
                                            skipped=skipped, loss_sums=sum_metric_sums(e["sums"] for e in extras),
                                            shaping=shaping))
        self.offload()
        return steps
