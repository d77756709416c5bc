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

import torch

from megatron_vgpo.algorithms.dapo import dapo_policy_loss, finalize_policy_metrics, sum_metric_sums
from megatron_vgpo.algorithms.vgpo import VGPOConfig, visual_focus_scores
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
    """One optimizer step of an update. ``loss_sums``: the policy loss's metric numerators and token
    count summed over the mini-batch's micro-batches (``dapo_policy_loss`` ``metric_sums``), device
    tensors on the last pipeline stage, empty elsewhere; turned into means where they are logged."""

    grad_norm: float
    lr: float
    loss_sums: dict[str, torch.Tensor] = field(default_factory=dict)


def update_metrics(stats: list[OptimizerStepStats], dp_group=None) -> dict[str, float]:
    """``actor/*`` metrics of an update: grad norm and LR averaged over its optimizer steps, and the
    policy-loss metrics as exact token means over every step's tokens on every data-parallel rank
    (the sums are all-reduced over ``dp_group``, which holds ranks of one pipeline stage only)."""
    import torch.distributed as dist

    if not stats:
        return {}
    out = {"actor/grad_norm": sum(s.grad_norm for s in stats) / len(stats),
           "actor/lr": sum(s.lr for s in stats) / len(stats)}
    sums = sum_metric_sums(s.loss_sums for s in stats)
    if sums:
        keys = sorted(sums)
        packed = torch.stack([sums[k].float() for k in keys])
        if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(packed, group=dp_group)
        totals = dict(zip(keys, packed.tolist()))
        out.update({f"actor/{k}": v for k, v in finalize_policy_metrics(totals).items()})
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

    def offload(self) -> None:
        """Optimizer states and grad buffers to host memory (``optimizer.offload_during_rollout``)."""
        self.offloader.offload()

    def onload(self) -> None:
        """Back on the device, for an update or a checkpoint."""
        self.offloader.onload()

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
    def old_logprobs_and_scores(self, exp: Experience, vgpo: VGPOConfig | None) -> tuple:
        """The pi_old pass over all rows: ``(old_logprobs [B, L], rho [B, L] or None)`` on the last
        pipeline stage, on the device; ``(None, None)`` elsewhere."""
        def loss_fn(batch: MicroBatch, out):
            rho = None
            if vgpo is not None:
                rho = visual_focus_scores(out.hidden_states, batch.image_mask, batch.response_mask,
                                          vgpo.variant, vgpo.eps)
            extras = {"rows": batch.rows, "logprobs": token_aligned(out.logprobs).float(), "rho": rho}
            device = out.logprobs.device
            return out.logprobs.new_zeros(()), torch.ones((), dtype=torch.int, device=device), extras

        for m in self.model:
            m.eval()
        batches = MicroBatches(exp, range(len(exp)), self.micro_batch_size)
        extras = run_pipeline(self.model, batches, loss_fn, forward_only=True, return_hidden_states=vgpo is not None,
                              device=self.device)
        if not self.groups.is_last_stage:
            return None, None
        width = exp.input_ids.shape[1]
        logprobs = scatter_rows([(e["rows"], e["logprobs"]) for e in extras], len(exp), width)
        rho = scatter_rows([(e["rows"], e["rho"]) for e in extras], len(exp), width) if vgpo is not None else None
        return logprobs, rho

    def update(self, exp: Experience, minibatch_rows: list[list[int]], alg, lr: float | None = None,
               schedule: bool = True) -> list[OptimizerStepStats]:
        """One optimizer step per mini-batch of local rows. ``lr`` overrides the learning rate of these
        steps; ``schedule=False`` leaves the LR schedule where it is (format warm-up). The optimizer
        state is on the device for the update and offloaded after it (when configured)."""
        for m in self.model:
            m.train()
        compute_entropy = alg.entropy_coef > 0

        def loss_fn(batch: MicroBatch, out):
            mask = batch.response_mask
            entropy = token_aligned(out.entropy) if out.entropy is not None else None
            result = dapo_policy_loss(
                token_aligned(out.logprobs), batch.old_logprobs, batch.advantages, mask,
                global_num_tokens=1.0,  # a SUM: finalize_model_grads divides by the global token count
                clip_ratio_low=alg.clip_ratio_low, clip_ratio_high=alg.clip_ratio_high,
                clip_ratio_c=alg.clip_ratio_c, entropy=entropy, entropy_coef=alg.entropy_coef)
            return result.loss, mask.sum().to(torch.int), result.metric_sums

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
            batches = MicroBatches(exp, rows, self.micro_batch_size, loss_inputs=True)
            extras = run_pipeline(self.model, batches, loss_fn, compute_entropy=compute_entropy,
                                  return_hidden_states=False, device=self.device)
            step_lr = self.optimizer.param_groups[0]["lr"]
            _, grad_norm, _ = self.optimizer.step()
            if schedule:
                self.scheduler.step(increment=increment)
            steps.append(OptimizerStepStats(float(grad_norm or 0.0), step_lr, sum_metric_sums(extras)))
        self.offload()
        return steps
