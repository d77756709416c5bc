"""Analyses of trained models: the visual-attention quantities of the VGPO paper's figures 2, 5, 6 and
appendix C (METHODS_SPEC.md section 8). ``python -m megatron_vgpo.analysis.attention --help``.

The pure functions live in ``metrics`` (importable without transformers); ``trace`` teacher-forces a
response through the HF model, ``inputs`` reads or generates the responses, ``figures`` draws them.
"""

from megatron_vgpo.analysis.metrics import (
    CLASSES, attention_late_early_ratio, attention_shares, binned_means, focus_late_early_ratio, pearson_r,
    renormalised_shares,
)

__all__ = [
    "CLASSES", "attention_late_early_ratio", "attention_shares", "binned_means", "focus_late_early_ratio",
    "pearson_r", "renormalised_shares",
]
