"""Rewards: the last ``\\boxed{}`` answer graded against the ground truth (mathruler by default, or
math-verify, or a user ``module:function``), an optional format reward, each grading call under a
wall-clock timeout in worker processes. ``RewardScorer(cfg.reward).score(responses, answers, infos)``.

The trainer grades each batch over all its ranks: ``rewards.distributed`` (``DistributedGrader``,
``rank_scorer``), imported from there and not here, because the grading workers import this package
and must not pay for torch.
"""

from megatron_vgpo.rewards.custom import CustomRewardError, load_custom_fn
from megatron_vgpo.rewards.extract import format_reward, last_boxed
from megatron_vgpo.rewards.graders import accuracy, load_grader
from megatron_vgpo.rewards.pool import GradingPool, RewardWorkerError
from megatron_vgpo.rewards.scorer import RewardResult, RewardScorer, summarize

__all__ = [
    "CustomRewardError", "GradingPool", "RewardResult", "RewardScorer", "RewardWorkerError", "accuracy",
    "format_reward", "last_boxed", "load_custom_fn", "load_grader", "summarize",
]
