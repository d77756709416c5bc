"""SRPO (Jiang & Zou 2026, "Structured Role-Aware Policy Optimization"; METHODS_SPEC section 6) -
PROVISIONAL: only the paper's abstract is public (no equations, no code).

What the abstract fixes: a response splits into PERCEPTION tokens and REASONING tokens; perception
tokens are weighted by their visual dependency (pi_old log-probs with the original vs a corrupted
image: VPPO's pass), reasoning tokens by their consistency with the generated perception; both are
unified through ONE shared trajectory-level baseline that gives POSITIVE token weights, so ``A``'s
sign (GRPO's direction) is preserved. Everything else below is OUR choice, each one a field of
``algorithm.srpo`` (``SRPOConfig``), to be replaced when the paper's text is available.

Per response ``i`` with an image, response tokens ``t``:

1. Roles (``roles``, located in the decoded response text by ``locate_perception``):
   ``auto``: the tokens inside the first ``<perception>...</perception>`` when the response has one
   (an unclosed tag runs to the end of the response); else the first ``ceil(f T_think)`` tokens of
   the ``<think>...</think>`` content; else the first ``ceil(f T_i)`` response tokens
   (``f = perception_fraction``). ``tags``: the tagged span only (no tag: no perception token);
   ``think_prefix``: the last two rules; ``prefix``: the last rule. Reasoning = every other response
   token (the tags themselves included). A token is inside a span when all its characters are: a
   token that BPE merged across a tag boundary (``">\\n"``, ``" </"``) counts as the tag's.
2. Perception score: ``D_t = clamp(k3(l_aug_t, l_old_t), 0, 10)``, VPPO's visual dependency
   (``vppo.visual_dependency``) with ``l_aug`` from the corrupted view (default VPPO's:
   ``mask_patches(p=0.5)`` after resizing, a fresh mask per response).
3. Reasoning score: ``c_t = (cos(h_t, m_i) + 1) / 2`` with ``h_t`` the final hidden state at token
   ``t`` (after the final norm, as VGPO's focus score) and ``m_i`` the mean ``h`` over the response's
   perception tokens (``perception_consistency``); no perception token: no reasoning score.
4. Per-role normalisation (``normalize``): ``minmax``: ``s_t = (x_t - min) / (max - min)`` over the
   role's tokens of the response (``x = D`` or ``c``); a role with fewer than 2 tokens or
   ``max - min <= 1e-6`` carries no signal and is left unscored; ``fixed``: ``s = D / 10`` and ``s = c``.
5. One shared trajectory baseline (``baseline``): ``tokens``: ``b_i`` = the mean of ``s`` over ALL
   scored tokens of the response, both roles together; ``roles``: the mean of the two roles' means.
6. Positive weights (``weight``): ``linear``: ``w_t = clamp(1 + lambda (s_t - b_i), w_min, w_max)``;
   ``exp``: ``w_t = clamp(exp(lambda (s_t - b_i)), w_min, w_max)``; ``lambda = strength``,
   ``0 < w_min <= 1 <= w_max``. Unscored tokens get ``w_t = 1``. With ``mean_one`` the weights are
   divided by their mean over the response's tokens. (With ``linear`` and ``baseline: tokens`` the
   weights already have mean 1 whenever no clamp binds.)
7. ``A'_{i,t} = A_{i,t} w_t``: ``w_t > 0`` keeps every advantage's sign, ``A = 0`` stays 0; the loss
   mask is unchanged.

A response whose prompt has no image keeps ``w = 1`` (no visual dependency to measure; as VGPO's and
VPPO's edge case). The tag-based roles need the tokenizer (``build_methods(algorithm, tokenizer=)``):
tags are found in the concatenation of the response tokens' individual decodings, exact for ASCII tags
under a byte-level BPE such as Qwen2's, however the tags were merged into tokens. Diagnostics
``srpo/*``. Config: ``algorithm.srpo``.
"""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field, fields
from typing import Literal, Optional, Sequence

import numpy as np
import torch

from megatron_vgpo.methods.base import (
    AdvantageShaper,
    ShapingInputs,
    ShapingResult,
    TokenStatistic,
    ViewLogProbs,
    masked,
    register_shaper,
)
from megatron_vgpo.methods.metrics import MetricSums
from megatron_vgpo.methods.views import DIFFUSION_STEPS, ImageView
from megatron_vgpo.methods.vppo import KL_CLAMP, visual_dependency

PROVISIONAL = "[provisional]"


def _f(default, help: str):
    return field(default=default, metadata={"help": f"{PROVISIONAL} {help}"})


@dataclass
class SRPOConfig:
    """SRPO's choices beyond its abstract (module docstring): all provisional, to be replaced by the
    paper's equations when they are public."""

    roles: Literal["auto", "tags", "think_prefix", "prefix"] = _f(
        "auto", "Perception tokens: 'auto' = inside perception_open..perception_close, else the first "
                "perception_fraction of the think span, else of the response; 'tags', 'think_prefix', "
                "'prefix': one rule of that chain (and those after it). Reasoning = the other response tokens.")
    perception_open: str = _f("<perception>", "Tag opening the perception span (the paper's format is not public).")
    perception_close: str = _f("</perception>", "Tag closing the perception span; unclosed: to the response's end.")
    think_open: str = _f("<think>", "Tag opening the think span (roles: auto, think_prefix).")
    think_close: str = _f("</think>", "Tag closing the think span; unclosed: to the end of the response.")
    perception_fraction: float = _f(
        0.3, "f: without perception tags, the first ceil(f * T) tokens of the span are perception, in [0, 1].")
    corruption: Literal["mask_patches", "gaussian_noise"] = _f(
        "mask_patches", "Corrupted image of the visual-dependency pass (default: VPPO's view, shared with VPPO).")
    mask_prob: float = _f(0.5, "mask_patches: probability that a 14x14 cell is blackened.")
    mask_placement: Literal["resized", "raw"] = _f(
        "resized", "mask_patches: mask the resized image (VPPO) or the raw one (PAPO).")
    noise_step: int = _f(500, "gaussian_noise: diffusion step t in [0, 999].")
    per: Literal["row", "prompt"] = _f("row", "One corruption per response row (VPPO) or per prompt (PAPO).")
    normalize: Literal["minmax", "fixed"] = _f(
        "minmax", "Per-role score normalisation: min-max over the role's tokens of each response (a constant "
                  "role is left unscored), or fixed maps D/10 and (cos + 1)/2.")
    baseline: Literal["tokens", "roles"] = _f(
        "tokens", "Shared trajectory baseline b_i: mean score over all scored tokens, or the mean of the two "
                  "role means.")
    weight: Literal["linear", "exp"] = _f(
        "linear", "Token weight: clamp(1 + strength (s - b), w_min, w_max), or clamp(exp(strength (s - b)), "
                  "w_min, w_max).")
    strength: float = _f(0.5, "lambda of the token weight, >= 0 (0: every weight 1, plain GRPO/DAPO).")
    w_min: float = _f(0.2, "Smallest token weight, in (0, 1]: weights stay positive, so A keeps its sign.")
    w_max: float = _f(2.0, "Largest token weight, >= 1.")
    mean_one: bool = _f(False, "Divide each response's weights by their mean over its tokens (mean weight 1).")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            choices = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) is Literal else None
            if choices is not None and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r} is invalid: must be one of {', '.join(choices)}")
        checks = [
            *[(tag, bool(getattr(self, tag)), "a non-empty string")
              for tag in ("perception_open", "perception_close", "think_open", "think_close")],
            ("perception_fraction", 0 <= self.perception_fraction <= 1, "in [0, 1]"),
            ("mask_prob", 0 <= self.mask_prob <= 1, "in [0, 1]"),
            ("noise_step", 0 <= self.noise_step < DIFFUSION_STEPS, f"in [0, {DIFFUSION_STEPS - 1}]"),
            ("strength", self.strength >= 0, ">= 0"),
            ("w_min", 0 < self.w_min <= 1, "in (0, 1] (positive weights keep A's sign)"),
            ("w_max", self.w_max >= 1, ">= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: must be {allowed}")

    @property
    def view(self) -> ImageView:
        if self.corruption == "gaussian_noise":
            return ImageView("gaussian_noise", noise_step=self.noise_step, per=self.per)
        return ImageView("mask_patches", p=self.mask_prob, cell=14, placement=self.mask_placement, per=self.per)

    @property
    def roles_key(self) -> str:
        """What determines the roles (the statistics' keys)."""
        tags = (self.perception_open, self.perception_close, self.think_open, self.think_close)
        return f"{self.roles},f={self.perception_fraction:g},tags={'|'.join(tags)}"


# ------------------------------------------------------------------------------------------- roles


@dataclass(frozen=True)
class TokenTexts:
    """Every token id's own decoding (``texts[id]``, ``lengths[id]`` characters); ids beyond the table
    (padded vocabulary rows) decode to ``""``."""

    texts: np.ndarray  # object [V + 1], the last entry ""
    lengths: np.ndarray  # int64 [V + 1]

    @classmethod
    def from_list(cls, texts: Sequence[str]) -> "TokenTexts":
        table = np.empty(len(texts) + 1, dtype=object)
        table[:-1], table[-1] = list(texts), ""
        return cls(table, np.fromiter((len(t) for t in table), dtype=np.int64, count=len(table)))

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "TokenTexts":
        """From a Hugging Face tokenizer (``len`` and ``batch_decode``), special tokens kept."""
        ids = [[i] for i in range(len(tokenizer))]
        return cls.from_list(tokenizer.batch_decode(ids, skip_special_tokens=False,
                                                    clean_up_tokenization_spaces=False))

    def pieces(self, ids: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
        """``(text, start, end)``: the concatenated decodings of ``ids`` and each token's character range."""
        ids = np.minimum(ids, len(self.texts) - 1)
        end = np.cumsum(self.lengths[ids])
        return "".join(self.texts[ids]), end - self.lengths[ids], end


def _span(text: str, open_tag: str, close_tag: str) -> Optional[tuple[int, int]]:
    """Characters between the first ``open_tag`` and the next ``close_tag`` (or the end), or None."""
    start = text.find(open_tag)
    if start < 0:
        return None
    start += len(open_tag)
    end = text.find(close_tag, start)
    return start, (len(text) if end < 0 else end)


def _prefix(inside: np.ndarray, fraction: float) -> np.ndarray:
    """The first ``ceil(fraction * n)`` of the ``n`` tokens marked ``inside``."""
    k = math.ceil(round(fraction * int(inside.sum()), 6))  # 0.3 * 10 is 3.0000000000000004
    return inside & (np.cumsum(inside) <= k)


def locate_perception(ids: np.ndarray, cfg: SRPOConfig, texts: Optional[TokenTexts]) -> np.ndarray:
    """Perception tokens of ONE response (``ids`` [T], its token ids) -> bool [T] (module docstring, 1)."""
    everything = np.ones(len(ids), dtype=bool)
    if cfg.roles == "prefix":
        return _prefix(everything, cfg.perception_fraction)
    if texts is None:
        raise ValueError(f"algorithm.srpo.roles={cfg.roles!r} locates tags in the response text and needs the "
                         f"tokenizer: build the methods with build_methods(algorithm, tokenizer=...) (the trainer "
                         f"does), or use roles=prefix")
    text, start, end = texts.pieces(ids)
    if cfg.roles in ("auto", "tags"):
        span = _span(text, cfg.perception_open, cfg.perception_close)
        if span is not None:
            return (start >= span[0]) & (end <= span[1])
        if cfg.roles == "tags":
            return ~everything
    span = _span(text, cfg.think_open, cfg.think_close)
    if span is not None:
        return _prefix((start >= span[0]) & (end <= span[1]), cfg.perception_fraction)
    return _prefix(everything, cfg.perception_fraction)


def perception_mask(input_ids: torch.Tensor, response_mask: torch.Tensor, cfg: SRPOConfig,
                    texts: Optional[TokenTexts]) -> torch.Tensor:
    """``[b, w]`` bool, the perception tokens of every response (``locate_perception`` per row; a
    Python loop over rows, string search per row: no per-token Python)."""
    ids, mask = input_ids.cpu().numpy(), response_mask.cpu().numpy()
    out = np.zeros(mask.shape, dtype=bool)
    for i in range(mask.shape[0]):
        out[i, mask[i]] = locate_perception(ids[i, mask[i]], cfg, texts)
    return torch.from_numpy(out).to(response_mask.device)


@torch.no_grad()
def perception_consistency(hidden_states: torch.Tensor, perception: torch.Tensor, response_mask: torch.Tensor,
                           eps: float = 1e-8) -> torch.Tensor:
    """``c_t = (cos(h_t, m) + 1) / 2`` on the reasoning tokens of responses that have perception tokens,
    ``m`` the mean ``h`` over the response's perception tokens; 0 elsewhere.
    ``[b, w, d]``, ``[b, w]`` bool x2 -> ``[b, w]`` float32."""
    h = hidden_states if hidden_states.dtype in (torch.float32, torch.float64) else hidden_states.float()
    p = perception.to(h.dtype)
    n = p.sum(-1)
    m = torch.einsum("bl,bld->bd", p, h) / n.clamp(min=1).unsqueeze(-1)
    dot = torch.einsum("bld,bd->bl", h, m)
    denom = torch.linalg.vector_norm(h, dim=-1) * torch.linalg.vector_norm(m, dim=-1).unsqueeze(-1) + eps
    cos = (dot / denom).float()
    reasoning = response_mask & ~perception & (n > 0).unsqueeze(-1)
    return torch.where(reasoning, (cos + 1.0) / 2.0, torch.zeros_like(cos))


class PerceptionRoles(TokenStatistic):
    """1 on the perception tokens of each response, 0 elsewhere: from the token ids (read on the host, a
    ``[b, w]`` copy per micro-batch), computed in the pass over the original view."""

    def __init__(self, cfg: SRPOConfig, texts: Optional[TokenTexts]):
        self.cfg, self.texts = cfg, texts
        self.name = f"srpo_roles[{cfg.roles_key}]"

    def compute(self, batch, output) -> torch.Tensor:
        return perception_mask(batch.input_ids, batch.response_mask, self.cfg, self.texts).float()


class PerceptionConsistency(TokenStatistic):
    """``c_t`` (``perception_consistency``) from the final hidden states of the original view."""

    needs_hidden_states = True

    def __init__(self, cfg: SRPOConfig, texts: Optional[TokenTexts]):
        self.cfg, self.texts = cfg, texts
        self.name = f"srpo_consistency[{cfg.roles_key}]"

    def compute(self, batch, output) -> torch.Tensor:
        perception = perception_mask(batch.input_ids, batch.response_mask, self.cfg, self.texts)
        return perception_consistency(output.hidden_states, perception, batch.response_mask)


# ----------------------------------------------------------------------------------------- weights


def _minmax(x: torch.Tensor, role: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row min-max of ``x`` over ``role``: ``(s in [0, 1], scored)``; a row's role with fewer than
    2 tokens or a span <= 1e-6 is unscored."""
    lo = x.masked_fill(~role, float("inf")).amin(-1, keepdim=True)
    hi = x.masked_fill(~role, float("-inf")).amax(-1, keepdim=True)
    ok = (role.sum(-1, keepdim=True) >= 2) & (hi - lo > 1e-6)
    span = torch.where(ok, hi - lo, torch.ones_like(hi))
    scored = role & ok
    return torch.where(scored, ((x - lo) / span).clamp(0.0, 1.0), torch.zeros_like(x)), scored


def role_scores(D: torch.Tensor, c: torch.Tensor, perception: torch.Tensor, response_mask: torch.Tensor,
                has_image: torch.Tensor, normalize: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-role normalised scores (module docstring, 2-4): ``(s [B, L], perception scored [B, L],
    reasoning scored [B, L])``; ``s`` is 0 where unscored."""
    rows = response_mask & has_image.unsqueeze(-1)
    P = rows & perception
    R = rows & ~perception & P.any(-1, keepdim=True)
    D, c = D.float(), c.float()
    if normalize == "minmax":
        sp, P = _minmax(D, P)
        sr, R = _minmax(c, R)
    elif normalize == "fixed":
        sp, sr = (D / KL_CLAMP).clamp(0.0, 1.0), c.clamp(0.0, 1.0)
    else:
        raise ValueError(f"normalize={normalize!r} is invalid: must be one of minmax, fixed")
    zero = torch.zeros_like(D)
    return torch.where(P, sp, torch.where(R, sr, zero)), P, R


def _row_mean(s: torch.Tensor, where: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = where.sum(-1)
    return torch.where(where, s, torch.zeros_like(s)).sum(-1) / n.clamp(min=1), n > 0


def shared_baseline(s: torch.Tensor, P: torch.Tensor, R: torch.Tensor, baseline: str) -> torch.Tensor:
    """``b_i`` [B] (module docstring, 5); 0 for a row without scored tokens."""
    if baseline == "tokens":
        return _row_mean(s, P | R)[0]
    if baseline == "roles":
        (mp, hp), (mr, hr) = _row_mean(s, P), _row_mean(s, R)
        return (mp * hp + mr * hr) / (hp.float() + hr.float()).clamp(min=1)
    raise ValueError(f"baseline={baseline!r} is invalid: must be one of tokens, roles")


def positive_weights(s: torch.Tensor, b: torch.Tensor, scored: torch.Tensor, response_mask: torch.Tensor,
                     cfg: SRPOConfig) -> torch.Tensor:
    """``w_t`` [B, L] (module docstring, 6): in ``[w_min, w_max]`` (> 0) on scored tokens, 1 elsewhere;
    divided by the response's mean weight with ``mean_one``."""
    z = cfg.strength * (s - b.unsqueeze(-1))
    w = (1.0 + z) if cfg.weight == "linear" else z.exp()
    w = torch.where(scored, w.clamp(cfg.w_min, cfg.w_max), torch.ones_like(w))
    if cfg.mean_one:
        mean, _ = _row_mean(w, response_mask)
        w = torch.where(response_mask, w / mean.clamp(min=1e-12).unsqueeze(-1), torch.ones_like(w))
    return w


def srpo_weights(D: torch.Tensor, c: torch.Tensor, perception: torch.Tensor, response_mask: torch.Tensor,
                 has_image: torch.Tensor, cfg: SRPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w, P, R)``: the token weights [B, L] of steps 4-6 and the scored perception / reasoning tokens."""
    s, P, R = role_scores(D, c, perception, response_mask, has_image, cfg.normalize)
    b = shared_baseline(s, P, R, cfg.baseline)
    return positive_weights(s, b, P | R, response_mask, cfg), P, R


@register_shaper
class SRPOShaper(AdvantageShaper):
    """``A'_{i,t} = A_{i,t} w_t`` with SRPO's role-aware positive weights (provisional), ``srpo/*``."""

    name = "srpo"
    needs_tokenizer = True

    def __init__(self, config: SRPOConfig, current: bool = False, tokenizer=None):
        super().__init__(current)
        self.config = config
        texts = TokenTexts.from_tokenizer(tokenizer) if tokenizer is not None and config.roles != "prefix" else None
        self.roles = PerceptionRoles(config, texts)
        self.consistency = PerceptionConsistency(config, texts)
        self.aug = ViewLogProbs(config.view)

    @classmethod
    def from_config(cls, algorithm, current: bool = False, tokenizer=None) -> "SRPOShaper":
        return cls(algorithm.srpo, current, tokenizer)

    def statistics(self) -> tuple[TokenStatistic, ...]:
        return (self.roles, self.consistency, self.aug)

    @torch.no_grad()
    def shape(self, inputs: ShapingInputs) -> ShapingResult:
        mask = inputs.response_mask
        perception = mask & (inputs.stats[self.roles.key] > 0.5)
        D = visual_dependency(inputs.stats[self.aug.key], inputs.old_logprobs, mask)
        c = masked(inputs.stats[self.consistency.key], mask)
        w, P, R = srpo_weights(D, c, perception, mask, inputs.has_image, self.config)
        metrics = MetricSums()
        metrics.ratio("srpo/perception_fraction", perception.float(), mask.float())
        metrics.mean("srpo/rows_with_perception", perception.any(-1)[mask.any(-1)].float())
        metrics.ratio("srpo/scored_fraction", (P | R).float(), mask.float())
        with_image = mask & inputs.has_image.unsqueeze(-1)
        metrics.mean("srpo/visual_dependency", D[with_image & perception])
        metrics.mean("srpo/consistency", c[with_image & ~perception & perception.any(-1, keepdim=True)])
        metrics.mean("srpo/weight_perception", w[perception])
        metrics.mean("srpo/weight_reasoning", w[mask & ~perception])
        metrics.min("srpo/weight_min", w[mask])
        metrics.max("srpo/weight_max", w[mask])
        return ShapingResult(masked(inputs.advantages * w, mask), inputs.loss_mask, metrics)
