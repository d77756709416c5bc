"""The reward of a rollout batch: accuracy of the last ``\\boxed{}`` (or a user function), format, total.

    scorer = RewardScorer(cfg.reward)          # starts the grading workers
    results = scorer.score(responses, answers, infos)   # one RewardResult per response
    metrics = summarize(results)               # reward/accuracy, reward/format, ... for logging
    scorer.close()

``total = (1 - format_weight) * accuracy + format_weight * format`` (EasyR1's weighting; with the
default ``format_weight = 0`` the reward is the paper's binary accuracy). The format reward is computed
here, in the trainer process (a linear string check that cannot hang), unless a custom function
returns its own. With ``parts_must_sum``, a multi-part row (``info["parts"]``) scores accuracy 0
unless its boxed total is also the sum of the counts its reasoning reads (``parts.sums_its_parts``,
a linear scan in this process too): the reads must carry the answer. A grading call that raises or
exceeds ``timeout_s`` scores accuracy 0, keeps the format reward, and is logged with its row id; the
batch always completes.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from megatron_vgpo.rewards.custom import load_custom_fn
from megatron_vgpo.rewards.extract import format_reward
from megatron_vgpo.rewards.graders import GRADERS
from megatron_vgpo.rewards.parts import sums_its_parts
from megatron_vgpo.rewards.pool import GradingPool, Outcome

if TYPE_CHECKING:
    from megatron_vgpo.config.schema import RewardConfig

logger = logging.getLogger(__name__)


@dataclass
class RewardResult:
    accuracy: float
    """Accuracy reward (grader: 0 or 1; a custom function may return any finite number)."""
    format: float
    """Format reward, 0 or 1 (or the custom function's)."""
    total: float
    """(1 - format_weight) * accuracy + format_weight * format: the reward the advantages use."""
    error: Optional[str] = None
    """Why grading failed (timeout, exception); accuracy is 0 then."""
    extra: dict[str, float] = field(default_factory=dict)
    """Other numbers a custom function returned."""

    @property
    def timed_out(self) -> bool:
        """The grading call ran past ``timeout_s`` (its worker was killed)."""
        return self.error is not None and self.error.startswith("timed out")


class RewardScorer:
    """Scores batches of responses; owns the grading worker pool of exactly ``cfg.num_workers``
    processes (0: grade in this process, without a timeout, for debugging). The trainer builds its
    per-rank scorers with ``distributed.rank_scorer``, which applies ``cfg.auto_workers``."""

    def __init__(self, cfg: "RewardConfig"):
        if cfg.grader not in GRADERS:
            raise ValueError(f"unknown reward.grader {cfg.grader!r}; choose one of {sorted(GRADERS)}")
        if not 0.0 <= cfg.format_weight <= 1.0:
            raise ValueError(f"reward.format_weight must be in [0, 1], got {cfg.format_weight}")
        if cfg.custom_fn:
            load_custom_fn(cfg.custom_fn)  # a bad spec fails here, named, before any worker starts
        elif cfg.grader == "math_verify" and importlib.util.find_spec("math_verify") is None:
            raise ImportError("reward.grader=math_verify needs the math-verify package: pip install math-verify")
        self.cfg = cfg
        self._pool = (GradingPool(cfg.num_workers, cfg.timeout_s, cfg.grader, cfg.custom_fn)
                      if cfg.num_workers > 0 else None)
        self._job = None

    def _run(self, jobs: list[tuple[str, str, dict]]) -> list[Outcome]:
        if self._pool is not None:
            return self._pool.map(jobs)
        from megatron_vgpo.rewards.worker import make_job, run_job

        if self._job is None:
            self._job = make_job(self.cfg.grader, self.cfg.custom_fn)
        return [Outcome(*run_job(self._job, *job)) for job in jobs]

    def score(self, responses: Sequence[str], ground_truths: Sequence[str],
              infos: Optional[Sequence[Mapping]] = None) -> list[RewardResult]:
        """One ``RewardResult`` per response. ``infos[i]`` (optional, picklable) goes to a custom
        function; its ``row_id`` names the row in logs."""
        if len(responses) != len(ground_truths) or (infos is not None and len(infos) != len(responses)):
            raise ValueError(f"score(): {len(responses)} responses, {len(ground_truths)} ground truths, "
                             f"{'no' if infos is None else len(infos)} infos")
        infos = [dict(i) for i in infos] if infos is not None else [{} for _ in responses]
        outcomes = self._run([(r, g, i) for r, g, i in zip(responses, ground_truths, infos)])
        w = self.cfg.format_weight
        results = []
        for response, info, outcome in zip(responses, infos, outcomes):
            if outcome.status == "ok":
                value = outcome.value
                accuracy, error, extra = float(value["accuracy"]), None, value["extra"]
                fmt = value["format"] if value["format"] is not None else format_reward(response)
                if self.cfg.parts_must_sum and info.get("parts") and not sums_its_parts(response, info["parts"]):
                    accuracy = 0.0
            else:
                accuracy, error, extra, fmt = 0.0, str(outcome.value), {}, format_reward(response)
                logger.warning("reward: row %s scored 0 (%s): %s", info.get("row_id", "?"), outcome.status, error)
            results.append(RewardResult(accuracy, fmt, (1.0 - w) * accuracy + w * fmt, error, extra))
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def summarize(results: Sequence[RewardResult]) -> dict[str, float]:
    """Batch means for logging: reward/{accuracy, format, total, error_rate, timeout_rate}."""
    n = max(len(results), 1)
    return {
        "reward/accuracy": sum(r.accuracy for r in results) / n,
        "reward/format": sum(r.format for r in results) / n,
        "reward/total": sum(r.total for r in results) / n,
        "reward/error_rate": sum(r.error is not None for r in results) / n,
        "reward/timeout_rate": sum(r.timed_out for r in results) / n,
    }
