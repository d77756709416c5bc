"""VGPO advantage shaping (VGPO_SPEC.md; paper arXiv 2604.09349, section 3, eqs. 2-12).

The shaping is split where the data flow of a pipeline-parallel trainer splits it:

1. ``visual_focus_scores`` (eqs. 2-4) is the only piece that reads hidden states. The trainer calls it
   on the last pipeline stage inside each micro-batch; only the ``[B, L]`` scores leave it.
2. ``trajectory_weights`` (eqs. 5-8) needs one response at a time: compensated weights ``w``, the gate,
   the intra-trajectory factor ``psi`` and the per-response sum ``s``.
3. ``inter_trajectory_factor`` (eqs. 9-11) needs whole groups (same prompt id). Group members may sit
   in other micro-batches or data-parallel ranks, so the caller gathers ``s``, ``has_image`` and
   ``group_ids`` (``[B]`` each, cheap) before calling it.
4. ``combine_advantages`` (eq. 12) multiplies the outcome advantage by both factors.

``shape_advantages`` composes 2-4 for scores that are all local; ``vgpo_shape_advantages`` composes
1-4 (the public one-call API). Every function is a vectorised tensor function: per-row ops are masked
reductions over ``L``, per-group ops are scatter reductions over ``group_ids`` in any row order.

Edge cases (the spec's decisions): a response whose prompt has no image gets psi = 0, phi = 0 and
leaves its group's min-max; padding never enters a min, max, mean or sum; a response of length 1 gets
psi = 0; A = 0 stays 0. Nothing here carries gradient.

``variant="official"`` reproduces the authors' released code (bugs excepted, see VGPO_SPEC.md): raw
cosine min-maxed over all response tokens of the call (the micro-batch), position ratio
``(t - 1) / (T - 1)`` in the schedule, ``s = sum(w_hat)``, and clamped factors
``psi' = clamp(1 + psi, 0.1, 2)``, ``phi' = clamp(1 + phi, 0.9, 2)``. Two deliberate differences
from that code: groups are prompt ids (its "group" was consecutive rows of a re-ordered micro-batch,
mixing prompts), and padding is left out of the micro-batch min-max (its padding-free path counted
padding as cosine 0, which makes the result depend on how much padding a batch happens to have).
In both variants the returned ``psi``/``phi`` are the *effective* factors minus one, so
``advantages == A * (1 + psi) * (1 + phi)`` holds on response tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from megatron_vgpo.algorithms.advantages import group_ids_to_index

# -------------------------------------------------------------------------------------------- config


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class VGPOConfig:
    """Hyper-parameters of VGPO shaping; defaults are the paper's (section 4.1)."""

    beta: float = _f(0.3, "Compensation intensity beta (eq. 5), >= 0.")
    gamma: float = _f(0.5, "Tail fraction gamma in (0, 1]: the gate region is t > (1 - gamma) T (eq. 6).")
    kappa: float = _f(0.2, "Top-kappa fraction of the tail's rho that passes the gate, in (0, 1] (eq. 6).")
    schedule: Literal["linear", "exponential", "step"] = _f(
        "linear", "Compensation schedule c(t/T): x, x^exponent, or 1[x >= step_at].")
    exponent: float = _f(2.0, "Exponent p of the 'exponential' schedule, > 0.")
    step_at: float = _f(0.5, "Threshold of the 'step' schedule, in [0, 1].")
    region: Literal["late", "full"] = _f("late", "Gate region: the response tail ('late') or the whole response.")
    intra: bool = _f(True, "Apply the intra-trajectory factor psi (eqs. 7-8).")
    inter: bool = _f(True, "Apply the inter-trajectory factor phi (eqs. 9-11).")
    variant: Literal["paper", "official"] = _f("paper", "The paper's equations, or the released code's behaviour.")
    eps: float = _f(1e-8, "Smoothing epsilon of the cosine and min-max normalisations.")

    def __post_init__(self) -> None:
        checks = [
            ("beta", self.beta >= 0, ">= 0"),
            ("gamma", 0 < self.gamma <= 1, "in (0, 1]"),
            ("kappa", 0 < self.kappa <= 1, "in (0, 1]"),
            ("exponent", self.exponent > 0, "> 0"),
            ("step_at", 0 <= self.step_at <= 1, "in [0, 1]"),
            ("eps", self.eps > 0, "> 0"),
            ("schedule", self.schedule in ("linear", "exponential", "step"), "one of linear, exponential, step"),
            ("region", self.region in ("late", "full"), "one of late, full"),
            ("variant", self.variant in ("paper", "official"), "one of paper, official"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")


@dataclass
class TrajectoryWeights:
    """Per-response quantities of eqs. 5-9 (all zero outside the response)."""

    w: torch.Tensor  # [B, L] compensated focus weight (eq. 5)
    gate: torch.Tensor  # [B, L] bool, G_t (eq. 6)
    psi: torch.Tensor  # [B, L] intra-trajectory factor (eq. 8), effective value minus one
    s: torch.Tensor  # [B] trajectory score fed to the group min-max (eq. 9)


@dataclass
class VGPOOutput:
    advantages: torch.Tensor  # [B, L] A'_{i,t} on response tokens, 0 elsewhere (eq. 12)
    rho: torch.Tensor  # [B, L] visual focus score (eq. 4), 0 outside the response
    w: torch.Tensor  # [B, L]
    psi: torch.Tensor  # [B, L]
    phi: torch.Tensor  # [B]
    gate: torch.Tensor  # [B, L] bool
    metrics: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------- masked helpers


def _masked_min(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row minimum of x [B, L] over mask [B, L]; +inf for empty rows. -> [B]"""
    return x.masked_fill(~mask, float("inf")).amin(dim=-1)


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row maximum of x [B, L] over mask [B, L]; -inf for empty rows. -> [B]"""
    return x.masked_fill(~mask, float("-inf")).amax(dim=-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Row mean of x [B, L] over mask [B, L]; 0 for empty rows. -> [B]"""
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def _round(x: torch.Tensor) -> torch.Tensor:
    """Round to 1e-6 so that thresholds such as (1 - 0.9) * 10 compare as the exact 1 they mean."""
    return torch.round(x * 1e6) / 1e6


# ------------------------------------------------------------------------------- 1. focus scores


@torch.no_grad()
def visual_focus_scores(
    hidden_states: torch.Tensor,
    image_mask: torch.Tensor,
    response_mask: torch.Tensor,
    variant: Literal["paper", "official"] = "paper",
    eps: float = 1e-8,
) -> torch.Tensor:
    """Visual focus score rho of every response token (eqs. 2-4).

    Args:
        hidden_states: [B, L, d] final hidden states after the final norm (HF ``hidden_states[-1]``).
        image_mask: [B, L] bool, positions of image tokens (``<|image_pad|>``) in the prompt.
        response_mask: [B, L] bool, positions of response tokens (read at the token's own position).
        variant: "paper": rho = (S + 1) / 2; "official": S min-maxed over all response tokens of this
            call (of samples that have an image), as the released code does per micro-batch.
        eps: smoothing term of the cosine (eq. 3) and of the official min-max.

    Returns:
        rho: [B, L] float32 in [0, 1] on response tokens of samples with an image, 0 elsewhere.

    mu_v (eq. 2) is the mean over all image positions of the sample (every image pooled). The three
    contractions are batched matmuls / one norm, so h is read three times and never copied (except one
    float32 copy when it arrives in bf16/fp16, for an accurate cosine).
    """
    h = hidden_states if hidden_states.dtype in (torch.float32, torch.float64) else hidden_states.float()
    img = image_mask.to(h.dtype)
    n_img = img.sum(-1)  # [B]
    mu = torch.einsum("bl,bld->bd", img, h) / n_img.clamp(min=1).unsqueeze(-1)  # eq. 2, [B, d]
    dot = torch.einsum("bld,bd->bl", h, mu)  # [B, L]
    denom = torch.linalg.vector_norm(h, dim=-1) * torch.linalg.vector_norm(mu, dim=-1).unsqueeze(-1) + eps
    cos = (dot / denom).float()  # eq. 3
    valid = response_mask & (n_img > 0).unsqueeze(-1)
    if variant == "paper":
        rho = (cos + 1.0) / 2.0  # eq. 4
    elif variant == "official":
        lo = cos.masked_fill(~valid, float("inf")).min()
        hi = cos.masked_fill(~valid, float("-inf")).max()
        rho = (cos - lo) / (hi - lo + eps) if valid.any() else torch.zeros_like(cos)
    else:
        raise ValueError(f"variant={variant!r} is invalid: must be one of paper, official")
    return torch.where(valid, rho, torch.zeros_like(rho))


# ------------------------------------------------------------------------- 2. per-trajectory terms


def _positions(response_mask: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token index t (1..T) [B, L] and position ratio x [B, L] (t / T, or (t - 1) / (T - 1) official)."""
    t = response_mask.cumsum(-1).to(torch.float64)
    T = response_mask.sum(-1, keepdim=True).to(torch.float64)
    if variant == "official":
        x = (t - 1) / (T - 1).clamp(min=1)
    else:
        x = t / T.clamp(min=1)
    return t, x


def compensation_schedule(x: torch.Tensor, config: VGPOConfig) -> torch.Tensor:
    """c(x) of eq. 5 for position ratios x in [0, 1]: linear x, exponential x^p, step 1[x >= step_at]."""
    if config.schedule == "linear":
        return x
    if config.schedule == "exponential":
        return x.pow(config.exponent)
    return (_round(x) >= config.step_at).to(x.dtype)


def visual_gate(rho: torch.Tensor, response_mask: torch.Tensor, t: torch.Tensor,
                config: VGPOConfig) -> torch.Tensor:
    """Gate G_t of eq. 6: t in the tail AND rho_t >= Q_kappa(tail). -> [B, L] bool

    The tail is t > (1 - gamma) T (both variants), or the whole response for region="full".
    Q_kappa is the k-th largest rho of the tail with k = max(1, floor(kappa * |tail|)); ties pass.
    """
    T = response_mask.sum(-1, keepdim=True).to(torch.float64)
    if config.region == "full":
        tail = response_mask
    else:
        tail = response_mask & (t > _round((1.0 - config.gamma) * T))
    n_tail = tail.sum(-1)  # [B]
    k = torch.floor(_round(config.kappa * n_tail.to(torch.float64))).long().clamp(min=1)
    ranked = rho.masked_fill(~tail, float("-inf")).sort(dim=-1, descending=True).values
    q = ranked.gather(-1, (k - 1).clamp(max=rho.shape[-1] - 1).unsqueeze(-1))  # [B, 1]
    return tail & (rho >= q)


@torch.no_grad()
def trajectory_weights(rho: torch.Tensor, response_mask: torch.Tensor, has_image: torch.Tensor,
                       config: VGPOConfig) -> TrajectoryWeights:
    """Compensated weights, gate, intra-trajectory factor and trajectory score (eqs. 5-9).

    Args:
        rho: [B, L] focus scores from ``visual_focus_scores``.
        response_mask: [B, L] bool.
        has_image: [B] bool, whether the response's prompt has an image (else psi = 0, s unused).
        config: VGPOConfig.

    w_t = rho_t (1 + G_t beta c(x_t)) (eq. 5); w_hat = min-max of w over the response (eq. 7);
    psi_t = w_hat_t - mean(w_hat) (eq. 8; official: clamp(1 + psi, 0.1, 2) - 1);
    s = sum_t w_t (eq. 9; official: sum_t w_hat_t).

    ``official`` with ``intra`` off follows the released code's inter-only path, where compensation
    and the gate live inside the intra-trajectory branch: ``w = rho`` (no compensation, no gate) and
    ``s`` sums the per-response min-max of rho.
    """
    valid = response_mask & has_image.unsqueeze(-1)
    rho = rho.float().masked_fill(~valid, 0.0)
    t, x = _positions(valid, config.variant)
    if config.variant == "official" and not config.intra:  # the released inter-only path
        gate = torch.zeros_like(valid)
        w = rho
    else:
        gate = visual_gate(rho, valid, t, config)
        w = rho * (1.0 + gate * config.beta * compensation_schedule(x, config).float())  # eq. 5
    lo, hi = _masked_min(w, valid), _masked_max(w, valid)
    w_hat = ((w - lo.unsqueeze(-1)) / (hi - lo + config.eps).unsqueeze(-1)).masked_fill(~valid, 0.0)  # eq. 7
    psi = w_hat - _masked_mean(w_hat, valid).unsqueeze(-1)  # eq. 8
    if config.variant == "official":  # (the upper bound never binds: psi <= 1 since w_hat is in [0, 1])
        psi = psi.add(1.0).clamp(0.1, 2.0).sub(1.0)
    psi = psi.masked_fill(~valid, 0.0) if config.intra else torch.zeros_like(psi)
    s = (w_hat if config.variant == "official" else w).sum(-1)  # eq. 9
    return TrajectoryWeights(w=w, gate=gate, psi=psi, s=s)


# ------------------------------------------------------------------------------ 3. per-group term


@torch.no_grad()
def inter_trajectory_factor(s: torch.Tensor, has_image: torch.Tensor, group_ids: torch.Tensor,
                            config: VGPOConfig) -> torch.Tensor:
    """Inter-trajectory factor phi (eqs. 10-11) over groups of equal ``group_ids``, rows in any order.

    Args:
        s: [B] trajectory scores (``TrajectoryWeights.s``) of EVERY member of the groups involved
            (gather them over micro-batches and data-parallel ranks first).
        has_image: [B] bool; responses without an image leave their group's min-max and get phi = 0.
        group_ids: [B] int64, same id = same prompt.

    Returns:
        phi: [B]; s_hat = (s - min_g s) / (max_g s - min_g s + eps), phi = s_hat - mean_g s_hat
        (official: clamp(1 + phi, 0.9, 2) - 1). Zero when ``config.inter`` is False.
    """
    if not config.inter:
        return torch.zeros_like(s, dtype=torch.float32)
    s = s.float()
    inv, G = group_ids_to_index(group_ids)
    lo = s.new_full((G,), float("inf")).scatter_reduce(0, inv[has_image], s[has_image], "amin")
    hi = s.new_full((G,), float("-inf")).scatter_reduce(0, inv[has_image], s[has_image], "amax")
    s_hat = torch.where(has_image, (s - lo[inv]) / (hi[inv] - lo[inv] + config.eps), torch.zeros_like(s))
    total = s.new_zeros(G).index_add(0, inv, s_hat)
    count = s.new_zeros(G).index_add(0, inv, has_image.float())
    phi = s_hat - (total / count.clamp(min=1))[inv]  # eq. 11
    if config.variant == "official":
        phi = phi.add(1.0).clamp(0.9, 2.0).sub(1.0)
    return torch.where(has_image, phi, torch.zeros_like(phi))


# ----------------------------------------------------------------------------------- 4. combine


def combine_advantages(advantages: torch.Tensor, psi: torch.Tensor, phi: torch.Tensor,
                       response_mask: torch.Tensor) -> torch.Tensor:
    """A'_{i,t} = A_i (1 + psi_{i,t}) (1 + phi_i) on response tokens, 0 elsewhere (eq. 12).

    advantages [B] (outcome) or [B, L] (token-level, e.g. after another shaper), psi [B, L], phi [B],
    response_mask [B, L] -> [B, L]
    """
    per_token = advantages.float() if advantages.dim() == 2 else advantages.float().unsqueeze(-1)
    shaped = per_token * (1.0 + psi) * (1.0 + phi.unsqueeze(-1))
    return shaped.masked_fill(~response_mask, 0.0)


# ---------------------------------------------------------------------------------- compositions


@torch.no_grad()
def shape_advantages(rho: torch.Tensor, response_mask: torch.Tensor, has_image: torch.Tensor,
                     advantages: torch.Tensor, group_ids: torch.Tensor, config: VGPOConfig) -> VGPOOutput:
    """Shaped advantages from focus scores, when every member of every group is in this batch.

    rho [B, L], response_mask [B, L] bool, has_image [B] bool, advantages [B], group_ids [B] int64.
    A trainer whose groups span data-parallel ranks calls ``trajectory_weights``, gathers ``s``,
    ``has_image`` and ``group_ids``, calls ``inter_trajectory_factor`` and ``combine_advantages``.
    """
    traj = trajectory_weights(rho, response_mask, has_image, config)
    phi = inter_trajectory_factor(traj.s, has_image, group_ids, config)
    shaped = combine_advantages(advantages, traj.psi, phi, response_mask)
    valid = response_mask & has_image.unsqueeze(-1)
    rho = rho.float().masked_fill(~valid, 0.0)
    return VGPOOutput(advantages=shaped, rho=rho, w=traj.w, psi=traj.psi, phi=phi, gate=traj.gate,
                      metrics=vgpo_metrics(rho, traj, phi, valid, has_image))


@torch.no_grad()
def vgpo_shape_advantages(hidden_states: torch.Tensor, image_mask: torch.Tensor, response_mask: torch.Tensor,
                          advantages: torch.Tensor, group_ids: torch.Tensor, config: VGPOConfig) -> VGPOOutput:
    """VGPO in one call (eqs. 2-12): hidden states [B, L, d] -> shaped advantages [B, L].

    image_mask [B, L] bool, response_mask [B, L] bool, advantages [B] float, group_ids [B] int64.
    Equal to ``shape_advantages(visual_focus_scores(...), ...)``; see the module docstring.
    """
    rho = visual_focus_scores(hidden_states, image_mask, response_mask, config.variant, config.eps)
    return shape_advantages(rho, response_mask, image_mask.any(-1), advantages, group_ids, config)


# --------------------------------------------------------------------------------------- metrics


def late_early_ratio(rho: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-response mean rho over the second half (t > T/2) over the first half (t <= T/2). -> [B]

    NaN for responses shorter than two tokens (no halves); callers take a nan-mean.
    """
    t = valid.cumsum(-1)
    T = valid.sum(-1, keepdim=True)
    late = valid & (2 * t > T)
    early = valid & (2 * t <= T)
    ratio = _masked_mean(rho, late) / _masked_mean(rho, early)
    return torch.where(T.squeeze(-1) >= 2, ratio, torch.full_like(ratio, float("nan")))


def visual_token_fractions(rho: torch.Tensor, valid: torch.Tensor, top_fraction: float = 0.4
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The released VGPO code's ``visual_token_percentage`` per response (METHODS_SPEC section 8):
    mark the top ``top_fraction`` tokens of each response by rho (``k = max(1, floor(f T))``, the k-th
    largest value as threshold, ties pass); ``f_early`` = marked tokens among the first ``floor(T / 2)``
    / T, ``f_late`` = marked among the rest / T. rho [B, L], valid [B, L] bool -> ([B], [B]); rows
    without a valid token give 0, 0. The logged ratio is ``mean(f_late) / (mean(f_early) + 1e-8)``."""
    T = valid.sum(-1)
    k = torch.floor(_round(top_fraction * T.to(torch.float64))).long().clamp(min=1)
    ranked = rho.float().masked_fill(~valid, float("-inf")).sort(dim=-1, descending=True).values
    threshold = ranked.gather(-1, (k - 1).clamp(max=rho.shape[-1] - 1).unsqueeze(-1))
    marked = valid & (rho.float() >= threshold)
    early = valid & (valid.cumsum(-1) <= (T // 2).unsqueeze(-1))
    count = T.clamp(min=1).to(torch.float32)
    return (marked & early).sum(-1) / count, (marked & ~early).sum(-1) / count


def vgpo_metrics(rho: torch.Tensor, traj: TrajectoryWeights, phi: torch.Tensor, valid: torch.Tensor,
                 has_image: torch.Tensor) -> dict:
    """Scalars for logging over responses with an image (local to this batch)."""
    n_tok = int(valid.sum())
    if n_tok == 0:
        return {"rho_mean": 0.0, "late_early_ratio": float("nan"), "gate_fraction": 0.0,
                "psi_std": 0.0, "phi_std": 0.0, "w_mean": 0.0}
    psi_tok = traj.psi[valid]
    phi_img = phi[has_image]
    return {
        "rho_mean": float(rho[valid].mean()),
        "late_early_ratio": float(late_early_ratio(rho, valid).nanmean()),
        "gate_fraction": float(traj.gate[valid].float().mean()),
        "psi_std": float(psi_tok.std(unbiased=False)),
        "phi_std": float(phi_img.std(unbiased=False)),
        "w_mean": float(traj.w[valid].mean()),
    }
