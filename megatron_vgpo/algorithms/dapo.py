"""DAPO: the clipped policy-gradient loss, the dynamic-sampling filter and the overlong penalty.

DAPO (Yu et al. 2025, arXiv 2503.14476) as the VGPO paper uses it (VGPO_SPEC.md "Base: DAPO / GRPO"):
clip-higher (``eps_low`` != ``eps_high``, DAPO eq. 10), token-level loss aggregation over every
response token of the mini-batch (eq. 12), dynamic sampling (eq. 11) and soft overlong punishment
(eq. 13); plus the dual clip for negative advantages (Ye et al. 2020) that the released VGPO config
enables with ``c = 3``, and the optional low-variance KL and entropy terms verl offers.

Metric reduction: ``dapo_policy_loss`` returns metric *numerators* summed over this micro-batch's
valid tokens together with the local token count (``metric_sums``). The caller adds them over
micro-batches (``sum_metric_sums``), all-reduces the sums over data-parallel ranks if it wants, and
divides once (``finalize_policy_metrics``); the result is the exact token mean over the whole
mini-batch, which averaging per-micro-batch means is not when micro-batches hold different numbers
of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from megatron_vgpo.algorithms.advantages import group_ids_to_index

__all__ = [
    "LOG_RATIO_CLAMP",
    "PolicyLossOutput",
    "dapo_policy_loss",
    "dynamic_sampling_keep",
    "finalize_policy_metrics",
    "kept_group_ids",
    "low_var_kl",
    "overlong_penalty",
    "sum_metric_sums",
]

LOG_RATIO_CLAMP = 20.0
"""``logp - logp_old`` is clamped to +-20 before ``exp`` (as verl does): a token whose probability
moved by more than e^20 is a numerical accident, and an inf ratio would make an inf/nan loss. The
clamp also zeroes that token's gradient, which is what the clip would do anyway."""

KL_CLAMP = 10.0
"""The k3 KL estimate is clamped to [-10, 10] per token, as verl's ``low_var_kl``."""


@dataclass
class PolicyLossOutput:
    """Result of ``dapo_policy_loss``.

    Attributes:
        loss: 0-d tensor with grad: this micro-batch's share of the mini-batch token-mean loss.
        metric_sums: detached 0-d tensors, each a SUM over this micro-batch's valid tokens:
            ``pg_loss`` (clipped per-token loss), ``pg_clipfrac_higher`` (tokens with A > 0 and
            ratio > 1 + eps_high), ``pg_clipfrac_lower`` (A < 0 and ratio < 1 - eps_low),
            ``pg_clipfrac_dual`` (A < 0 and the dual clip ``c * |A|`` bound was active), ``ppo_kl``
            (``logp_old - logp``), ``kl`` (k3 to the reference, when given), ``entropy`` (when
            given), and ``num_tokens`` (the local valid-token count, the denominator of them all).
    """

    loss: torch.Tensor
    metric_sums: dict[str, torch.Tensor]

    def local_metrics(self) -> dict[str, float]:
        """Token means over this micro-batch alone (for logging a single micro-batch)."""
        return finalize_policy_metrics(self.metric_sums)


def sum_metric_sums(parts: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Add ``metric_sums`` of several micro-batches key by key (all must have the same keys)."""
    total: dict[str, torch.Tensor] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total[key] + value if key in total else value.clone()
    return total


def finalize_policy_metrics(sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Turn summed numerators into token means: ``sums[k] / sums["num_tokens"]`` for every other key."""
    count = max(float(sums["num_tokens"]), 1.0)
    return {key: float(value) / count for key, value in sums.items() if key != "num_tokens"}


def low_var_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 KL estimator of ``KL(pi || pi_ref)`` (Schulman 2020; verl ``low_var_kl``).

    ``k3 = exp(ref - logp) - (ref - logp) - 1``, always >= 0 and unbiased, with the log-ratio clamped
    to +-20 and the estimate to [-10, 10] for stability. Shapes: ``[B, L]`` -> ``[B, L]``.
    """
    log_ratio = (ref_logprobs - logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (log_ratio.exp() - log_ratio - 1.0).clamp(-KL_CLAMP, KL_CLAMP)


def _validate_loss_args(
    shapes: Mapping[str, torch.Tensor | None],
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None,
    global_num_tokens: int | float | torch.Tensor,
) -> None:
    reference = shapes["logprobs"].shape  # type: ignore[union-attr]
    if len(reference) != 2:
        raise ValueError(f"logprobs must be [B, L], got shape {tuple(reference)}")
    for name, tensor in shapes.items():
        if tensor is not None and tensor.shape != reference:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(reference)}")
    if not 0.0 <= clip_ratio_low < 1.0:
        raise ValueError(f"clip_ratio_low must be in [0, 1), got {clip_ratio_low}")
    if not clip_ratio_high >= 0.0:
        raise ValueError(f"clip_ratio_high must be >= 0, got {clip_ratio_high}")
    if clip_ratio_c is not None and not clip_ratio_c > 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (or None to disable the dual clip), got {clip_ratio_c}")
    if not isinstance(global_num_tokens, torch.Tensor) and not global_num_tokens > 0:
        raise ValueError(f"global_num_tokens must be > 0, got {global_num_tokens}")


def _clipped_pg_losses(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_ratio_low: float,
    clip_ratio_high: float,
    clip_ratio_c: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token clipped surrogate (DAPO eq. 10 plus dual clip) and the masks of active clips."""
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    clipped = torch.maximum(pg1, pg2)
    negative = advantages < 0
    flags = {
        "pg_clipfrac_higher": (advantages > 0) & (ratio > 1.0 + clip_ratio_high),
        "pg_clipfrac_lower": negative & (ratio < 1.0 - clip_ratio_low),
    }
    if clip_ratio_c is None:
        flags["pg_clipfrac_dual"] = torch.zeros_like(negative)
        return clipped, flags
    dual_bound = -advantages * clip_ratio_c
    flags["pg_clipfrac_dual"] = negative & (clipped > dual_bound)
    return torch.where(negative, torch.minimum(clipped, dual_bound), clipped), flags


def dapo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    global_num_tokens: int | float | torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.28,
    clip_ratio_c: float | None = 3.0,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    pg_mask: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """DAPO clipped policy-gradient loss with token-level aggregation.

    Per valid token (DAPO eq. 10 with clip-higher; dual clip of Ye et al. 2020 for A < 0)::

        ratio = exp(clamp(logp - logp_old, -20, 20))
        l     = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
        l     = min(l, -A * c)              if A < 0 and c is not None
        loss  = (sum l + kl_coef * sum k3(ref, logp) - entropy_coef * sum H) / N

    summed over this micro-batch's valid tokens. ``N = global_num_tokens`` is the number of valid
    response tokens of the WHOLE mini-batch, over all micro-batches and data-parallel ranks (DAPO
    eq. 12's ``sum_i |o_i|``): summing these per-micro-batch losses (gradient accumulation) and
    all-reducing gradients with a SUM then gives the exact token mean. (If the DP reduction averages
    instead, pass ``N / dp_size``.) Masked positions never reach the loss or the gradient, even if
    they hold nan or inf.

    Args:
        logprobs: ``[B, L]`` log-probs of the taken tokens under the current policy (with grad).
        old_logprobs: ``[B, L]`` log-probs under the rollout policy ``pi_old`` (no grad needed).
        advantages: ``[B, L]`` token-level advantages, already shaped (e.g. VGPO eq. 12).
        response_mask: ``[B, L]`` bool, True on response tokens that count.
        global_num_tokens: the ``N`` above, > 0 (python number or 0-d tensor).
        clip_ratio_low, clip_ratio_high: ``eps_low``, ``eps_high`` (DAPO: 0.2, 0.28).
        clip_ratio_c: dual-clip constant ``c > 1``, or None to disable it.
        ref_logprobs: ``[B, L]`` reference log-probs for the k3 KL term (see ``low_var_kl``).
        kl_coef: weight of the KL term (0: the paper's setting, no KL).
        entropy: ``[B, L]`` per-token entropy of the current policy, for the bonus and the metric.
        entropy_coef: weight of the entropy bonus (subtracted from the loss).
        pg_mask: ``[B, L]`` bool, the response tokens that keep their policy-gradient term (a shaper's
            token filter, e.g. VPPO's); the others still count in ``N`` and in the metrics. None: all.

    Returns:
        ``PolicyLossOutput`` (loss and metric sums; see its docstring).
    """
    _validate_loss_args(
        {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages,
         "response_mask": response_mask, "ref_logprobs": ref_logprobs, "entropy": entropy, "pg_mask": pg_mask},
        clip_ratio_low, clip_ratio_high, clip_ratio_c, global_num_tokens,
    )
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Mask before exp so that nan/inf in padding can't leak into the loss or (via 0 * nan) the grad.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), zero)
    ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    pg = mask if pg_mask is None else mask & pg_mask.bool()
    adv = torch.where(pg, advantages.detach().to(logprobs.dtype), zero)
    pg_losses, flags = _clipped_pg_losses(ratio, adv, clip_ratio_low, clip_ratio_high, clip_ratio_c)

    total = pg_losses.sum()  # tokens outside pg have adv = 0, hence loss 0
    sums = {"pg_loss": total.detach(), "num_tokens": mask.sum().to(logprobs.dtype)}
    sums.update({k: (v & mask).sum().to(logprobs.dtype) for k, v in flags.items()})
    sums["ppo_kl"] = -log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).sum()
    if ref_logprobs is not None:
        # Both inputs masked first: exp's backward is grad * exp(x), and 0 * nan would leak into the grad.
        kl = low_var_kl(torch.where(mask, logprobs, zero), torch.where(mask, ref_logprobs, zero))
        sums["kl"] = kl.detach().sum()
        total = total + kl_coef * kl.sum()
    if entropy is not None:
        ent = torch.where(mask, entropy, zero).sum()
        sums["entropy"] = ent.detach()
        total = total - entropy_coef * ent
    return PolicyLossOutput(loss=total / global_num_tokens, metric_sums=sums)


@torch.no_grad()
def dynamic_sampling_keep(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling (eq. 11): keep only groups whose rewards are not all equal.

    A group whose rewards have zero spread (all 0 or all 1 with a binary reward) has zero GRPO
    advantage everywhere and so no gradient; DAPO drops it and refills the batch. A group of one row
    has zero spread and is dropped too (verl keeps those; they carry no signal either way). The test
    is ``max_g(r) > min_g(r)``, exact, rather than ``std > 0``.

    Args:
        rewards: ``[B]`` float (the sequence-level reward or accuracy the filter looks at).
        group_ids: ``[B]`` integer prompt ids, rows in any order.

    Returns:
        ``[B]`` bool, True for the rows of kept groups.
    """
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards and group_ids must both be [B], got {tuple(rewards.shape)} "
                         f"and {tuple(group_ids.shape)}")
    inverse, num_groups = group_ids_to_index(group_ids)
    r = rewards.detach().to(torch.float64)
    empty = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    high = empty.scatter_reduce(0, inverse, r, reduce="amax", include_self=False)
    low = empty.scatter_reduce(0, inverse, r, reduce="amin", include_self=False)
    return (high > low)[inverse]


def kept_group_ids(group_ids: torch.Tensor, keep_rows: torch.Tensor) -> torch.Tensor:
    """The distinct ids of the groups ``dynamic_sampling_keep`` kept, sorted; ``.numel()`` counts them."""
    return torch.unique(group_ids[keep_rows])


@torch.no_grad()
def overlong_penalty(
    response_lengths: torch.Tensor,
    max_response_length: int,
    buffer_length: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO soft overlong punishment (eq. 13), added to the task reward.

    With ``L_max = max_response_length`` and ``L_cache = buffer_length``::

        R(y) = 0                                     if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
             = -1                                    if |y| > L_max

    times ``penalty_factor``. The middle line reaches -1 at ``|y| = L_max``, so the penalty is a ramp
    from 0 to ``-penalty_factor`` that stays flat beyond ``L_max``.

    Args:
        response_lengths: ``[B]`` integer number of generated tokens per response.
        max_response_length: ``L_max`` > 0.
        buffer_length: ``L_cache``, in ``1..max_response_length``.
        penalty_factor: scale of the penalty, >= 0.

    Returns:
        ``[B]`` float32 penalties in ``[-penalty_factor, 0]``.
    """
    if not max_response_length > 0:
        raise ValueError(f"max_response_length must be > 0, got {max_response_length}")
    if not 0 < buffer_length <= max_response_length:
        raise ValueError(f"buffer_length must be in [1, max_response_length={max_response_length}], "
                         f"got {buffer_length}")
    if not penalty_factor >= 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    start = max_response_length - buffer_length
    over = (response_lengths.to(torch.float32).clamp(max=max_response_length) - start).clamp(min=0)
    return -over / buffer_length * penalty_factor
