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
"""

from __future__ import annotations

import torch

from megatron_vgpo.algorithms.dapo import dapo_policy_loss, finalize_policy_metrics, sum_metric_sums
from megatron_vgpo.algorithms.vgpo import VGPOConfig, visual_focus_scores
from megatron_vgpo.models.qwen2_5_vl.pipeline import run_pipeline
from megatron_vgpo.training.experience import Experience, micro_batches, scatter_rows, token_aligned


def _megatron_optimizer(model: list, opt_cfg, params_dtype: torch.dtype, distributed: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam", lr=opt_cfg.lr, min_lr=opt_cfg.min_lr, weight_decay=opt_cfg.weight_decay,
        adam_beta1=opt_cfg.adam_beta1, adam_beta2=opt_cfg.adam_beta2, adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        params_dtype=params_dtype, use_distributed_optimizer=distributed)
    return get_megatron_optimizer(config, model)


class Actor:
    """Owns this rank's policy chunks for training (``chunks`` stay the unwrapped modules)."""

    def __init__(self, chunks: list, groups, opt_cfg, micro_batch_size: int, total_steps: int):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        self.chunks, self.groups, self.micro_batch_size = chunks, groups, micro_batch_size
        # The distributed optimizer shards states over DP with CUDA-only buffers: GPU only.
        distributed = opt_cfg.use_distributed_optimizer and torch.cuda.is_available()
        ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                use_distributed_optimizer=distributed)
        self.model = [DistributedDataParallel(c.config, ddp_cfg, c) for c in chunks]
        for chunk in chunks:
            chunk.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = _megatron_optimizer(self.model, opt_cfg, chunks[0].config.params_dtype, distributed)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if opt_cfg.lr_warmup_steps else opt_cfg.lr, max_lr=opt_cfg.lr,
            min_lr=opt_cfg.min_lr, lr_warmup_steps=opt_cfg.lr_warmup_steps,
            lr_decay_steps=max(total_steps, opt_cfg.lr_warmup_steps + 1), lr_decay_style=opt_cfg.lr_decay_style,
            start_wd=opt_cfg.weight_decay, end_wd=opt_cfg.weight_decay, wd_incr_steps=max(total_steps, 1),
            wd_incr_style="constant")

    @torch.no_grad()
    def old_logprobs_and_scores(self, exp: Experience, vgpo: VGPOConfig | None) -> tuple:
        """The pi_old pass over all rows: ``(old_logprobs [B, L], rho [B, L] or None)`` on the last
        pipeline stage, ``(None, None)`` elsewhere."""
        def loss_fn(batch, out):
            rho = None
            if vgpo is not None:
                rho = visual_focus_scores(out.hidden_states, batch.extra["image_mask"], batch.extra["response_mask"],
                                          vgpo.variant, vgpo.eps)
            extras = {"rows": batch.extra["rows"], "logprobs": token_aligned(out.logprobs).float(), "rho": rho}
            return out.logprobs.new_zeros(()), torch.tensor(1, dtype=torch.int), extras

        for m in self.model:
            m.eval()
        batches = micro_batches(exp, range(len(exp)), self.micro_batch_size)
        extras = run_pipeline(self.model, batches, loss_fn, forward_only=True, return_hidden_states=vgpo is not None)
        if not self.groups.is_last_stage:
            return None, None
        width = exp.input_ids.shape[1]
        logprobs = scatter_rows([(e["rows"], e["logprobs"]) for e in extras], len(exp), width)
        rho = scatter_rows([(e["rows"], e["rho"]) for e in extras], len(exp), width) if vgpo is not None else None
        return logprobs, rho

    def update(self, exp: Experience, minibatch_rows: list[list[int]], alg, lr: float | None = None,
               schedule: bool = True) -> list[dict]:
        """One optimizer step per mini-batch of local rows; returns per-step metrics (last stage has the
        loss metrics; every rank has grad_norm and lr). ``lr`` overrides the learning rate of these
        steps; ``schedule=False`` leaves the LR schedule where it is (format warm-up)."""
        for m in self.model:
            m.train()
        compute_entropy = alg.entropy_coef > 0

        def loss_fn(batch, out):
            mask = batch.extra["response_mask"]
            entropy = token_aligned(out.entropy) if out.entropy is not None else None
            result = dapo_policy_loss(
                token_aligned(out.logprobs), batch.extra["old_logprobs"], batch.extra["advantages"], mask,
                global_num_tokens=1.0,  # a SUM: finalize_model_grads divides by the global token count
                clip_ratio_low=alg.clip_ratio_low, clip_ratio_high=alg.clip_ratio_high,
                clip_ratio_c=alg.clip_ratio_c, entropy=entropy, entropy_coef=alg.entropy_coef)
            return result.loss, mask.sum().to(torch.int), result.metric_sums

        steps = []
        for rows in minibatch_rows:
            for m in self.model:
                m.zero_grad_buffer()
            self.optimizer.zero_grad()
            if lr is not None:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            batches = micro_batches(exp, rows, self.micro_batch_size, old_logprobs=exp.old_logprobs,
                                    advantages=exp.advantages)
            extras = run_pipeline(self.model, batches, loss_fn, compute_entropy=compute_entropy,
                                  return_hidden_states=False)
            _, grad_norm, _ = self.optimizer.step()
            if schedule:
                self.scheduler.step(increment=1)
            metrics = {"actor/grad_norm": float(grad_norm or 0.0), "actor/lr": self.optimizer.param_groups[0]["lr"]}
            if extras:
                sums = sum_metric_sums(extras)
                metrics.update({f"actor/{k}": v for k, v in finalize_policy_metrics(sums).items()})
            steps.append(metrics)
        return steps
