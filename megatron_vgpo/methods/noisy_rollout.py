"""NoisyRollout (METHODS_SPEC section 5; Liu et al. 2025): half of each group sees a noisy image.

Each prompt is generated ``rollout.n`` times on its clean image and ``rollout.n`` times on a noisy copy;
the ``2n`` responses form ONE group (one group id) for the outcome advantage. Training conditions every
row on the clean image: the old log-probs, the ratio and the loss all use the clean pixels (a row
refers to its prompt's ``PromptExample``, whose images are the clean ones), so only the rollout side
changes. The engine's log-probs of the noisy rows were computed on other pixels; they are left out
of the rollout/trainer mismatch metric.

The noise is ``views.gaussian_noise(t)`` (the diffusion schedule over 1000 steps) at the annealed step

    t(s) = floor(alpha0 * (1 - sigmoid(c * (s - s_mid) / S_total)))                      (eq. 1)

``s`` the RL step, ``S_total`` the run's steps (``trainer.total_steps``), clamped to ``[0, 999]``. One
noisy copy per prompt and step (``per="prompt"``), seeded from ``(seed, step, row id)``. Composes with
every advantage shaper (e.g. ``algorithm.shapers=[vgpo]``): the shapers see groups of ``2n`` rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_vgpo.methods.base import RolloutMethod, register_rollout_method
from megatron_vgpo.methods.views import DIFFUSION_STEPS, ImageView


@dataclass
class NoisyRolloutConfig:
    """The noise schedule (defaults: the paper's Geo3K run)."""

    alpha0: float = field(default=500.0, metadata={"help": "alpha0: the diffusion step of the noise at the start (t <= 999)."})
    c: float = field(default=30.0, metadata={"help": "c: steepness of the sigmoid annealing of the noise step."})
    s_mid: float = field(default=40.0, metadata={"help": "s_mid: the RL step at the middle of the annealing."})

    def __post_init__(self) -> None:
        if not 0 <= self.alpha0 < DIFFUSION_STEPS + 1:
            raise ValueError(f"alpha0={self.alpha0!r} is invalid: must be in [0, {DIFFUSION_STEPS}]")


def noise_step(step: int, total_steps: int, alpha0: float, c: float, s_mid: float) -> int:
    """Eq. 1: the diffusion step of the noise at RL step ``step`` of ``total_steps``, in ``[0, 999]``."""
    x = c * (step - s_mid) / max(total_steps, 1)
    sigmoid = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    return min(max(math.floor(alpha0 * (1.0 - sigmoid)), 0), DIFFUSION_STEPS - 1)


@register_rollout_method
class NoisyRollout(RolloutMethod):
    """``rollout.n`` more responses per prompt on a noisy image, in the same group (module docstring)."""

    name = "noisy_rollout"
    num_views = 1

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def from_config(cls, algorithm, tokenizer=None) -> "NoisyRollout":
        return cls(algorithm.noisy_rollout)

    def generation_views(self, step: int, total_steps: int) -> tuple[ImageView, ...]:
        t = noise_step(step, total_steps, self.cfg.alpha0, self.cfg.c, self.cfg.s_mid)
        return (ImageView("gaussian_noise", noise_step=t, per="prompt"),)

    def metrics(self, step: int, total_steps: int) -> dict[str, float]:
        return {"noisy_rollout/noise_step": float(self.generation_views(step, total_steps)[0].noise_step)}
