"""The visual-attention analysis quantities as pure tensor functions (METHODS_SPEC.md section 8).

The VGPO paper's figure 2 plots, per decoding step, how the final layer's attention (heads averaged)
splits between the image, the question and the text generated so far; its figure 2(c) the late/early
ratio of visual attention; its appendix C the Pearson r between the focus score rho and the attention
on image tokens. ``analysis/attention.py`` computes these on real responses; the functions here are
the math, batched over responses (``[B, L]``, padding masked) and tested on hand-made tensors.

Conventions:
- Key positions carry a class (``CLASSES``): image (``<|image_pad|>``), question (the user turn's text),
  generated (response tokens) and other (system turn, chat-template and vision-marker tokens).
- The attention row of response token t is the row at the position OF token t (where its hidden state,
  hence rho_t, is read); causal, so its generated mass covers tokens 1..t (itself included).
- Halves of a response of T tokens: early = the first floor(T / 2) tokens, late = the rest (the
  released VGPO code's split).
"""

from __future__ import annotations

import torch

from megatron_vgpo.algorithms.vgpo import visual_token_fractions

CLASSES = ("image", "question", "generated", "other")
IMAGE, QUESTION, GENERATED, OTHER = range(len(CLASSES))


def attention_shares(attn: torch.Tensor, classes: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """Raw four-way attention shares of each query row: the mass on each key class.

    Args:
        attn: [B, H, L, L] softmax attention weights of one layer (rows = queries), or [B, L, L]
            already averaged over heads. Rows sum to 1 over the causal keys.
        classes: [B, L] long in 0..3, the class of each key position (``CLASSES`` order).
        query_mask: [B, L] bool, the rows to report (response tokens).

    Returns:
        [B, L, 4] float32 shares (image, question, generated, other); each reported row sums to 1,
        other rows are 0. One batched matmul with the one-hot classes: no loop over steps.
    """
    if attn.dim() == 4:
        attn = attn.float().mean(dim=1)  # heads averaged (the paper's figure 2 and appendix C)
    onehot = torch.nn.functional.one_hot(classes, len(CLASSES)).to(torch.float32)
    shares = torch.bmm(attn.float(), onehot)
    return shares * query_mask.unsqueeze(-1)


def renormalised_shares(raw: torch.Tensor) -> torch.Tensor:
    """Shares over image / question / generated only (METHODS_SPEC 8): raw [..., 4] -> [..., 3],
    each row divided by its mass on those three classes (all-zero rows stay 0)."""
    three = raw[..., :OTHER]
    total = three.sum(-1, keepdim=True)
    return torch.where(total > 0, three / total.clamp(min=1e-30), torch.zeros_like(three))


def _halves(response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(early [B, L], late [B, L], T [B]): early = the first floor(T / 2) response tokens."""
    T = response_mask.sum(-1)
    early = response_mask & (response_mask.cumsum(-1) <= (T // 2).unsqueeze(-1))
    return early, response_mask & ~early, T


def attention_late_early_ratio(image_share: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Attention-based late/early ratio per response (METHODS_SPEC 8 (a), the paper's figure 2(c)):
    image share summed over the late half / summed over the early half.

    image_share [B, L], response_mask [B, L] bool -> [B] float32; NaN where T < 2 or the early sum is 0.
    """
    early, late, T = _halves(response_mask)
    share = image_share.float()
    num, den = (share * late).sum(-1), (share * early).sum(-1)
    ratio = num / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where((T >= 2) & (den > 0), ratio, torch.full_like(ratio, float("nan")))


def focus_late_early_ratio(rho: torch.Tensor, response_mask: torch.Tensor, top_fraction: float = 0.4) -> float:
    """Focus-score-based late/early ratio as the released VGPO code logs it
    (``visual_token_percentage_late_early_ratio``, METHODS_SPEC 8 (b)).

    Per response, the top ``top_fraction`` tokens by rho are marked (k = max(1, floor(top_fraction T)),
    ties pass); f_early = marked among the first floor(T / 2) tokens / T, f_late = marked among the
    rest / T (``algorithms.vgpo.visual_token_fractions``). Returns mean(f_late) / (mean(f_early) + 1e-8)
    over the responses with at least one token; NaN when there is none.

    rho [B, L] (any monotone form of the focus score: the marks depend only on the order),
    response_mask [B, L] bool. Leave responses without an image out of the mask: their rho is 0.
    """
    rows = response_mask.any(-1)
    if not bool(rows.any()):
        return float("nan")
    f_early, f_late = visual_token_fractions(rho, response_mask, top_fraction)
    return float(f_late[rows].mean() / (f_early[rows].mean() + 1e-8))


def pearson_r(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of x and y over the masked positions of each row.

    x [B, L], y [B, L], mask [B, L] bool -> [B] float64; NaN where fewer than two positions or a
    constant x or y. For the pooled value over all responses, pass the masked values as one row.
    """
    m = mask.to(torch.float64)
    n = m.sum(-1, keepdim=True)
    x, y = x.to(torch.float64), y.to(torch.float64)
    dx = (x - (x * m).sum(-1, keepdim=True) / n.clamp(min=1)) * m
    dy = (y - (y * m).sum(-1, keepdim=True) / n.clamp(min=1)) * m
    cov, vx, vy = (dx * dy).sum(-1), (dx * dx).sum(-1), (dy * dy).sum(-1)
    ok = (n.squeeze(-1) >= 2) & (vx > 0) & (vy > 0)
    r = cov / torch.where(ok, (vx * vy).sqrt(), torch.ones_like(vx))
    return torch.where(ok, r, torch.full_like(r, float("nan")))


def binned_means(values: torch.Tensor, response_mask: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Per-response means of ``values`` in ``n_bins`` equal bins of the normalised decoding step.

    Token t (1..T) falls in bin floor((t - 1) n_bins / T), so every bin covers the same fraction of
    its response. values [B, L, C], response_mask [B, L] bool -> [B, n_bins, C] float64; NaN in bins
    holding no token (responses shorter than n_bins). Average over responses with ``nanmean`` so
    that each response weighs the same whatever its length.
    """
    B, L, C = values.shape
    t = response_mask.cumsum(-1) - 1  # 0-based step
    T = response_mask.sum(-1, keepdim=True).clamp(min=1)
    bins = torch.div(t * n_bins, T, rounding_mode="floor").clamp(0, n_bins - 1)
    bins = torch.where(response_mask, bins, torch.full_like(bins, n_bins))  # a spill bin for padding
    sums = torch.zeros(B, n_bins + 1, C, dtype=torch.float64, device=values.device)
    sums.scatter_add_(1, bins.unsqueeze(-1).expand(B, L, C), values.to(torch.float64))
    counts = torch.zeros(B, n_bins + 1, dtype=torch.float64, device=values.device)
    counts.scatter_add_(1, bins, torch.ones_like(bins, dtype=torch.float64))
    means = sums[:, :n_bins] / counts[:, :n_bins].unsqueeze(-1)
    return torch.where(counts[:, :n_bins].unsqueeze(-1) > 0, means, torch.full_like(means, float("nan")))
