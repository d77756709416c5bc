"""VPPO (Huang et al. 2025, github huaixuheqing/VPPO-RL; the VGPO paper's "DAPO w/ KL-perception";
METHODS_SPEC section 2).

One extra forward-only pass of pi_old with ``mask_patches(p=0.5)`` on the resized image, a fresh mask
per response row, gives ``l_aug``; with the pi_old log-probs ``l_old`` of the original images:

- visual dependency ``D_t = clamp(k3(l_aug_t, l_old_t), 0, 10)`` (log-ratio clamped to [-20, 20]);
- token gradient filtering: ``k_i = ceil(rho * T_i)`` tokens with the largest ``D_t`` keep their
  policy-gradient term (ties broken by position: the earlier token first [ours: the released code's
  unstable sort breaks them arbitrarily]); the token-mean denominator stays ALL response tokens;
- trajectory advantage shaping: ``S_i = mean_t D_t``, ``s~_i = clamp((S_i - lo) / (hi - lo), 0, 1)``
  with ``lo, hi`` the min / max of ``S`` over the normalisation scope, ``mu`` the mean of ``s~`` over
  its scope, ``alpha_i = b_min + (1 - b_min) s~_i / (mu + 1e-8)`` (1 when the scope has fewer than two
  rows or ``hi - lo <= 1e-6``), ``A'_{i,t} = alpha_i A_{i,t}``; a response without an image (or without
  tokens) keeps alpha 1 and stays out of ``lo``, ``hi`` and ``mu`` [ours, as VGPO's edge case]. Scope ``batch`` [ours, default]: the
  whole step over all data-parallel ranks (layout-independent); ``group``: each prompt's group;
  ``official``: ``lo, hi`` over this rank's PPO mini-batch and ``mu`` over its update micro-batch, as
  the released code (results then depend on the parallel layout and the micro-batch size);
- an entropy penalty ``c_H * H_s`` (``H_s`` the sample entropy, minus the mean log-prob of the sampled
  tokens) over ALL response tokens, the filter not applied: VPPO's companion loss term.

Config: ``algorithm.vppo``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.distributed as dist

from megatron_vgpo.algorithms.advantages import group_ids_to_index
from megatron_vgpo.methods.base import (
    AdvantageShaper,
    LossInputs,
    LossTerm,
    ShapingInputs,
    ShapingResult,
    TokenStatistic,
    ViewLogProbs,
    k3,
    masked,
    register_shaper,
)
from megatron_vgpo.methods.metrics import MetricSums
from megatron_vgpo.methods.views import ImageView

KL_CLAMP = 10.0


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class VPPOConfig:
    """VPPO's hyper-parameters; defaults are the paper script's."""

    mask_prob: float = _f(0.5, "Probability that a 14x14 cell of the resized image is blackened in the extra view.")
    token_fraction: float = _f(0.4, "rho: fraction of each response's tokens (largest D_t) kept in the policy gradient.")
    b_min: float = _f(0.9, "Smallest trajectory advantage scale alpha, in [0, 1].")
    entropy_coef: float = _f(0.06, "c_H of the entropy penalty c_H * H_s over all response tokens; 0 disables it.")
    scope: Literal["batch", "group", "official"] = _f(
        "batch", "Normalisation scope of the trajectory scale: the whole step, each group, or the released "
                 "code's (per mini-batch and micro-batch: layout-dependent).")

    def __post_init__(self) -> None:
        checks = [("mask_prob", 0 <= self.mask_prob <= 1, "in [0, 1]"),
                  ("token_fraction", 0 < self.token_fraction <= 1, "in (0, 1]"),
                  ("b_min", 0 <= self.b_min <= 1, "in [0, 1]"), ("entropy_coef", self.entropy_coef >= 0, ">= 0"),
                  ("scope", self.scope in ("batch", "group", "official"), "one of batch, group, official")]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")

    @property
    def view(self) -> ImageView:
        return ImageView("mask_patches", p=self.mask_prob, cell=14, placement="resized", per="row")


def visual_dependency(aug_logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``D_t = clamp(k3(l_aug_t, l_old_t), 0, 10)`` on response tokens, 0 elsewhere. [B, L] -> [B, L]"""
    return masked(k3(aug_logprobs.float(), old_logprobs.float()).clamp(0.0, KL_CLAMP), mask)


def token_filter(D: torch.Tensor, mask: torch.Tensor, fraction: float) -> torch.Tensor:
    """``[B, L]`` bool: the ``ceil(fraction * T_i)`` response tokens of each row with the largest ``D``,
    ties broken by position (a stable sort: the earlier token first)."""
    T = mask.sum(-1).double()
    k = torch.ceil(torch.round(fraction * T * 1e6) / 1e6).long()  # 0.07 * 100 is 7.000000000000001
    order = D.masked_fill(~mask, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(D.shape[-1], device=D.device).expand_as(order))
    return mask & (rank < k.unsqueeze(-1))


def _scope_index(scope: str, group_ids: torch.Tensor, minibatches: Sequence[Sequence[int]],
                 micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm_scope [B], mu_scope [B])`` dense indices of each row's normalisation and mean scopes."""
    B, device = group_ids.shape[0], group_ids.device
    if scope == "group":
        index, _ = group_ids_to_index(group_ids)
        return index, index
    if scope == "batch":
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        return zeros, zeros
    norm, mu = torch.full((B,), -1, dtype=torch.long), torch.zeros(B, dtype=torch.long)
    micro = 0
    for m, rows in enumerate(minibatches):
        for j, r in enumerate(rows):
            norm[r], mu[r] = m, micro + j // micro_batch_size
        micro += math.ceil(len(rows) / micro_batch_size)
    if (norm < 0).any():
        raise ValueError(f"VPPO scope 'official': rows {torch.nonzero(norm < 0).flatten().tolist()[:5]} are in no "
                         f"mini-batch")
    return norm.to(device), mu.to(device)


def trajectory_scale(S: torch.Tensor, b_min: float, scope: str, group_ids: torch.Tensor,
                     minibatches: Sequence[Sequence[int]] = (), micro_batch_size: int = 1, dp_group=None,
                     scored: torch.Tensor | None = None) -> torch.Tensor:
    """``alpha_i`` of VPPO's trajectory advantage shaping (module docstring) for the scores ``S`` [B].
    ``scored`` [B] bool: the rows that take part (default all); the others (a prompt without an image,
    an empty response: no visual dependency to measure) get alpha 1 and stay out of lo, hi and mu."""
    S = S.double()
    scored = torch.ones_like(S, dtype=torch.bool) if scored is None else scored
    norm, mu_scope = _scope_index(scope, group_ids, minibatches, micro_batch_size)
    n = 1 if scope == "batch" else (int(norm.max()) + 1 if norm.numel() else 0)  # one scope even on an empty rank
    lo = S.new_full((n,), float("inf")).scatter_reduce(0, norm[scored], S[scored], "amin")
    hi = S.new_full((n,), float("-inf")).scatter_reduce(0, norm[scored], S[scored], "amax")
    rows = S.new_zeros(n).index_add(0, norm[scored], torch.ones_like(S[scored]))
    step_wide = scope == "batch" and dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1
    if step_wide:
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=dp_group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=dp_group)
        dist.all_reduce(rows, group=dp_group)
    degenerate = ((rows < 2) | (hi - lo <= 1e-6))[norm] | ~scored
    span = torch.where(degenerate, torch.ones_like(S), (hi - lo)[norm])
    s_tilde = torch.where(degenerate, torch.zeros_like(S), ((S - lo[norm]) / span).clamp(0.0, 1.0))
    m = 1 if scope == "batch" else (int(mu_scope.max()) + 1 if mu_scope.numel() else 0)
    total = S.new_zeros(m).index_add(0, mu_scope[scored], s_tilde[scored])
    count = S.new_zeros(m).index_add(0, mu_scope[scored], torch.ones_like(S[scored]))
    if step_wide:
        packed = torch.cat([total, count])
        dist.all_reduce(packed, group=dp_group)
        total, count = packed[:m], packed[m:]
    mu = (total / count.clamp(min=1))[mu_scope]
    alpha = b_min + (1.0 - b_min) * s_tilde / (mu + 1e-8)
    return torch.where(degenerate, torch.ones_like(alpha), alpha).float()


@register_shaper
class VPPOShaper(AdvantageShaper):
    name = "vppo"

    def __init__(self, config: VPPOConfig, current: bool = False):
        super().__init__(current)
        self.config, self.aug = config, ViewLogProbs(config.view)

    @classmethod
    def from_config(cls, algorithm, current: bool = False) -> "VPPOShaper":
        return cls(algorithm.vppo, current)

    def statistics(self) -> tuple[TokenStatistic, ...]:
        return (self.aug,)

    def loss_terms(self) -> tuple[LossTerm, ...]:
        return (SampleEntropyPenalty(self.config.entropy_coef),) if self.config.entropy_coef > 0 else ()

    @torch.no_grad()
    def shape(self, inputs: ShapingInputs) -> ShapingResult:
        cfg, mask = self.config, inputs.response_mask
        D = visual_dependency(inputs.stats[self.aug.key], inputs.old_logprobs, mask)
        keep = token_filter(D, mask, cfg.token_fraction)
        S = D.sum(-1) / mask.sum(-1).clamp(min=1)
        alpha = trajectory_scale(S, cfg.b_min, cfg.scope, inputs.group_ids, inputs.minibatches,
                                 inputs.micro_batch_size, inputs.dp_group, scored=inputs.has_image & mask.any(-1))
        metrics = MetricSums()
        metrics.mean("vppo/visual_dependency", D[mask])
        metrics.ratio("vppo/kept_fraction", keep.float(), mask.float())
        metrics.mean("vppo/alpha_mean", alpha)
        metrics.min("vppo/alpha_min", alpha)
        metrics.max("vppo/alpha_max", alpha)
        advantages = masked(inputs.advantages * alpha.unsqueeze(-1), mask)
        return ShapingResult(advantages, inputs.loss_mask & keep, metrics)


class SampleEntropyPenalty(LossTerm):
    """``+ coef * H_s``: ``coef * sum_t (-l_t)`` over the response tokens (a token sum; divided by the
    mini-batch's token count it is ``coef`` times the sample entropy)."""

    name = "vppo"

    def __init__(self, coef: float):
        self.coef = coef

    def statistics(self) -> tuple[TokenStatistic, ...]:
        return ()

    def loss_sum(self, inputs: LossInputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        neg_logprobs = -masked(inputs.logprobs, inputs.response_mask)
        total = neg_logprobs.sum()
        return self.coef * total, {"sample_entropy": total.detach()}

