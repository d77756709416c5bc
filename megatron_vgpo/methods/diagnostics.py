"""Focus-score diagnostics logged under every method (DAPO included), so that runs of different methods
can be compared on the quantity the VGPO paper plots.

From the pi_old pass over the original images (its last stage already holds the hidden states of
each micro-batch; the focus score costs three contractions of them): ``focus/rho_mean``, the mean
focus score rho (VGPO eq. 4, ``paper`` form) of response tokens with an image, and
``focus/late_early_ratio``, the released VGPO code's ``visual_token_percentage_late_early_ratio``
(``algorithms/vgpo.py: visual_token_fractions``), both over the whole step (all data-parallel ranks).
"""

from __future__ import annotations

from megatron_vgpo.algorithms.vgpo import visual_token_fractions
from megatron_vgpo.methods.metrics import MetricSums
from megatron_vgpo.methods.vgpo import FocusScores

FOCUS = FocusScores("paper")


def focus_diagnostics(stats, response_mask, has_image) -> MetricSums:
    """``focus/*`` of this rank's rows, in reducible form (``MetricSums``)."""
    rho = stats[FOCUS.key]
    valid = response_mask & has_image.unsqueeze(-1)
    rows = valid.any(-1)
    f_early, f_late = visual_token_fractions(rho, valid)
    metrics = MetricSums()
    metrics.mean("focus/rho_mean", rho[valid])
    metrics.ratio_of_means("focus/late_early_ratio", f_late[rows], f_early[rows], eps=1e-8)
    return metrics
