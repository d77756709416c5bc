"""PAPO (Wang et al. 2025, github MikeWangWZHL/PAPO; PAPO-D = on DAPO; METHODS_SPEC section 3): a loss
term, advantages untouched.

One extra forward-only pass of pi_old with ``mask_patches(p=0.6)`` on the RAW image (one mask per
prompt, shared by its responses) gives ``l_aug``. Per response token, with ``l_t`` the current policy's
log-prob (with gradient):

    delta_t = clamp(l_aug_t - l_t, -20, 20),  kappa_t = min(exp(delta_t) - delta_t - 1, 10)
    L = L_dapo - gamma * tokenmean(kappa) + eta_o * H_s(l) + eta_a * H_s(l_aug)

``H_s`` is the sample entropy (minus the mean log-prob of the sampled tokens); the last term has no
gradient (``l_aug`` is a constant of the update). Every term, ``L_dapo`` included, is a token mean over
the whole mini-batch [ours; the released code takes per-micro-batch means and averages them, equal
only for equal token counts]: the term returns token SUMS that Megatron divides by the global token
count. Optional: ``gamma`` (and, with ``anneal_entropy``, the entropy weights) annealed linearly to 0
over the first ``anneal_fraction`` of the run. Watch ``papo/kl`` and both entropies: too large a
gamma without the entropy terms collapses the policy. Config: ``algorithm.papo`` (PAPO-D defaults).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_vgpo.methods.base import (
    LossInputs,
    LossTerm,
    TokenStatistic,
    ViewLogProbs,
    k3,
    masked,
    register_loss_term,
)
from megatron_vgpo.methods.views import ImageView

KL_CLAMP = 10.0


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class PAPOConfig:
    """PAPO's hyper-parameters; defaults are PAPO-D's (PAPO-G: gamma 0.02, eta 0.05, plus a ref-KL)."""

    gamma: float = _f(0.01, "Weight of the implicit perception loss -gamma * tokenmean(kappa), >= 0.")
    eta_orig: float = _f(0.03, "Weight eta_o of the sample-entropy penalty of the current policy, >= 0.")
    eta_aug: float = _f(0.03, "Weight eta_a of the sample entropy of the masked view (a constant), >= 0.")
    mask_prob: float = _f(0.6, "Probability that a 14x14 cell of the raw image is blackened in the masked view.")
    anneal_fraction: float = _f(0.0, "Anneal gamma linearly to 0 over this fraction of the run; 0 disables it.")
    anneal_entropy: bool = _f(True, "Anneal the entropy weights together with gamma.")

    def __post_init__(self) -> None:
        for name in ("gamma", "eta_orig", "eta_aug"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be >= 0")
        if not 0 <= self.mask_prob <= 1:
            raise ValueError(f"mask_prob={self.mask_prob!r} is invalid: must be in [0, 1]")
        if not 0 <= self.anneal_fraction <= 1:
            raise ValueError(f"anneal_fraction={self.anneal_fraction!r} is invalid: must be in [0, 1]")

    @property
    def view(self) -> ImageView:
        return ImageView("mask_patches", p=self.mask_prob, cell=14, placement="raw", per="prompt")


def anneal(step: int, total_steps: int, fraction: float) -> float:
    """The annealing factor at (0-based) trainer ``step``: 1 without annealing, else
    ``max(0, 1 - step / (fraction * total_steps))``."""
    if fraction <= 0:
        return 1.0
    return max(0.0, 1.0 - step / (fraction * total_steps))


def perception_kl(logprobs: torch.Tensor, aug_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``kappa_t = min(k3(l_aug_t, l_t), 10)`` on response tokens (gradient through ``l_t`` only)."""
    return masked(k3(aug_logprobs.detach().float(), logprobs.float()).clamp(max=KL_CLAMP), mask)


@register_loss_term
class PAPOLoss(LossTerm):
    name = "papo"

    def __init__(self, config: PAPOConfig):
        self.config, self.aug = config, ViewLogProbs(config.view)

    @classmethod
    def from_config(cls, algorithm) -> "PAPOLoss":
        return cls(algorithm.papo)

    def statistics(self) -> tuple[TokenStatistic, ...]:
        return (self.aug,)

    def loss_sum(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, mask = self.config, inputs.response_mask
        factor = anneal(inputs.step, inputs.total_steps, cfg.anneal_fraction)
        entropy_factor = factor if cfg.anneal_entropy else 1.0
        aug = inputs.stats[self.aug.key]
        kappa = perception_kl(inputs.logprobs, aug, mask).sum()
        entropy = -masked(inputs.logprobs, mask).sum()
        entropy_aug = -masked(aug, mask).sum()
        total = (-cfg.gamma * factor * kappa + cfg.eta_orig * entropy_factor * entropy
                 + cfg.eta_aug * entropy_factor * entropy_aug.detach())
        n = mask.sum().float()
        return total, {"kl": kappa.detach(), "entropy": entropy.detach(), "entropy_aug": entropy_aug.detach(),
                       "gamma": cfg.gamma * factor * n}

