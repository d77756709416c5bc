"""Entropy-based advantage shaping (Cheng et al. 2025, "Reasoning with Exploration: An Entropy
Perspective"; the VGPO paper's "DAPO w/ Entropy"; METHODS_SPEC section 1).

    A'_{i,t} = A_{i,t} + min(alpha * H_t, |A_{i,t}| / kappa)

with ``A_{i,t}`` the token-level advantages so far: the outcome ``A_i`` of METHODS_SPEC when the shaper
is listed first (or alone); after another shaper (e.g. ``shapers: [vgpo, entropy]``) the cap follows
that shaper's advantage.

``H_t``: the FULL-vocabulary entropy of the policy's next-token distribution at the position that
predicts token ``t``, detached (computed vocab-parallel on the last stage, ``vocab_parallel.py``; at
sampling temperature 1, the temperature our rollouts use). The bonus is never negative and at most
``|A| / kappa``: with ``kappa > 1`` an advantage keeps its sign, and ``A = 0`` stays 0. From the pi_old
pass by default (advantages fixed before the update, like VGPO's), from the current policy per update
micro-batch with ``algorithm.hidden_states_from=current``. Config: ``algorithm.entropy``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_vgpo.methods.base import (
    AdvantageShaper,
    ShapingInputs,
    ShapingResult,
    TokenStatistic,
    masked,
    register_shaper,
)
from megatron_vgpo.methods.metrics import MetricSums


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class EntropyShapingConfig:
    """Hyper-parameters of entropy-based advantage shaping (values for GRPO from secondary sources; the
    VGPO paper gives none)."""

    alpha: float = _f(0.4, "Scale alpha of the entropy bonus alpha * H_t, >= 0.")
    kappa: float = _f(2.0, "The bonus is capped at |A| / kappa; kappa > 1 keeps every advantage's sign.")

    def __post_init__(self) -> None:
        if not self.alpha >= 0:
            raise ValueError(f"alpha={self.alpha!r} is invalid: must be >= 0")
        if not self.kappa > 1:
            raise ValueError(f"kappa={self.kappa!r} is invalid: must be > 1 (the cap |A| / kappa keeps A's sign)")


def entropy_bonus(advantages: torch.Tensor, entropy: torch.Tensor, response_mask: torch.Tensor,
                  alpha: float, kappa: float) -> torch.Tensor:
    """``min(alpha * H_t, |A_t| / kappa)`` on response tokens, 0 elsewhere. [B, L] x3 -> [B, L]"""
    bonus = torch.minimum(alpha * entropy.float().detach(), advantages.float().abs() / kappa)
    return masked(bonus, response_mask)


class TokenEntropy(TokenStatistic):
    """H_t of the original view, token-aligned (the entropy at the position predicting token t)."""

    name = "entropy"
    needs_entropy = True

    def compute(self, batch, output) -> torch.Tensor:
        from megatron_vgpo.training.experience import token_aligned

        return masked(token_aligned(output.entropy), batch.response_mask)


@register_shaper
class EntropyShaper(AdvantageShaper):
    name = "entropy"
    supports_current = True

    def __init__(self, config: EntropyShapingConfig, current: bool = False):
        super().__init__(current)
        self.config, self.entropy = config, TokenEntropy()

    @classmethod
    def from_config(cls, algorithm, current: bool = False) -> "EntropyShaper":
        return cls(algorithm.entropy, current)

    def statistics(self) -> tuple[TokenStatistic, ...]:
        return (self.entropy,)

    @torch.no_grad()
    def shape(self, inputs: ShapingInputs) -> ShapingResult:
        mask = inputs.response_mask
        H = inputs.stats[self.entropy.key]
        bonus = entropy_bonus(inputs.advantages, H, mask, self.config.alpha, self.config.kappa)
        metrics = MetricSums()
        metrics.mean("entropy/token_entropy", H[mask])
        metrics.mean("entropy/bonus", bonus[mask])
        metrics.ratio("entropy/capped_fraction", (mask & (self.config.alpha * H > inputs.advantages.abs()
                                                          / self.config.kappa)).float(), mask.float())
        return ShapingResult(masked(inputs.advantages + bonus, mask), inputs.loss_mask, metrics)

