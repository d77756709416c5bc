"""Rollout-vs-trainer log-prob mismatch: the health check of weight sync and position handling.

The rollout engine returns the log-prob of every sampled token under its copy of the policy; the
trainer recomputes the same quantity in its ``pi_old`` pass. With the same weights and float32 they
agree to ~1e-6; a resharding bug (a swapped q/k/v group, a mis-sliced TP shard, a stale weight), a
wrong M-RoPE position or mismatched image pixels shows up as a mean |difference| orders of magnitude
larger, long before the reward curve says anything. Logged every step (verl and NeMo-RL log the same
quantity); in bfloat16 expect ~1e-2.

Both sides must be raw model log-probs at temperature 1 (what ``RolloutBatch.response_logprobs``
holds, see ``vllm_engine.py``), over the sampled response tokens only: ``mask`` excludes padding
(and anything else the caller wants out, e.g. truncated responses).

Reduction follows ``algorithms/dapo.py``: sums and counts per micro-batch, all-reduced (SUM for the
sums, MAX for the max) over data-parallel ranks, divided once, so the mean is the exact token mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class LogprobMismatch:
    """Running totals of |logp_rollout - logp_trainer| over valid tokens (0-dim float64 tensors)."""

    abs_diff_sum: torch.Tensor
    abs_diff_max: torch.Tensor
    num_tokens: torch.Tensor

    def __add__(self, other: "LogprobMismatch") -> "LogprobMismatch":
        return LogprobMismatch(self.abs_diff_sum + other.abs_diff_sum,
                               torch.maximum(self.abs_diff_max, other.abs_diff_max),
                               self.num_tokens + other.num_tokens)

    def all_reduce(self, group: Optional[dist.ProcessGroup] = None) -> "LogprobMismatch":
        """The totals over all ranks of ``group`` (in place; returns self). Collective."""
        sums = torch.stack([self.abs_diff_sum, self.num_tokens])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        peak = self.abs_diff_max.clone()
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        self.abs_diff_sum, self.num_tokens, self.abs_diff_max = sums[0], sums[1], peak
        return self

    @property
    def mean(self) -> float:
        return float(self.abs_diff_sum / self.num_tokens.clamp_min(1))

    def metrics(self, prefix: str = "rollout/") -> dict[str, float]:
        return {f"{prefix}logprob_diff_mean": self.mean, f"{prefix}logprob_diff_max": float(self.abs_diff_max)}


def logprob_mismatch(rollout_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                     mask: torch.Tensor) -> LogprobMismatch:
    """|logp_rollout - logp_trainer| totals over the tokens where ``mask`` is True.

    Args:
        rollout_logprobs: ``[B, T]`` log-probs of the sampled tokens returned by the engine.
        trainer_logprobs: ``[B, T]`` the trainer's log-probs of the same tokens (any float dtype).
        mask: ``[B, T]`` bool (or 0/1), True on valid response tokens.
    Returns:
        ``LogprobMismatch``; ``.mean`` and ``.abs_diff_max`` are 0 when no token is valid.
    """
    if rollout_logprobs.shape != trainer_logprobs.shape or rollout_logprobs.shape != mask.shape:
        raise ValueError(f"shapes differ: rollout {tuple(rollout_logprobs.shape)}, trainer "
                         f"{tuple(trainer_logprobs.shape)}, mask {tuple(mask.shape)}")
    mask = mask.bool()
    diff = (rollout_logprobs.double() - trainer_logprobs.detach().double().to(rollout_logprobs.device)).abs()
    diff = torch.where(mask, diff, torch.zeros_like(diff))
    return LogprobMismatch(abs_diff_sum=diff.sum(), abs_diff_max=diff.max() if diff.numel() else diff.new_zeros(()),
                           num_tokens=mask.sum().double())
