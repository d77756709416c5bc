"""PNG figures of the attention analysis, drawn like the VGPO paper's figure 2.

- ``attention_shares.png`` (figure 2(b)): share of image / question / generated tokens (renormalised
  over the three) against the normalised decoding step, correct and incorrect responses in separate
  panels, and a third panel with the image share alone, correct vs incorrect, on its own scale.
- ``late_early_ratio.png`` (figure 2(c)): the distribution of the attention-based late/early ratio of
  incorrect (left) and correct (right) responses, their means marked.
- ``focus_vs_attention.png`` (appendix C and the bottom of figure 2(a)): rho against the final layer's
  image attention for every token, and one example response's shares and rho step by step.

matplotlib is optional (as for ``training.logging.plot_scalars``): without it, a warning and no PNGs.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from megatron_vgpo.analysis.metrics import CLASSES, IMAGE, OTHER

logger = logging.getLogger(__name__)

COLORS = {"image": "tab:red", "question": "tab:gray", "generated": "tab:blue"}  # the paper's line colours
GROUPS = ("correct", "incorrect")
MAX_POINTS = 20000
"""At most about this many tokens are drawn in the rho-vs-attention scatter."""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _empty(ax) -> None:
    ax.text(0.5, 0.5, "no responses", ha="center", va="center", transform=ax.transAxes, color="gray")


def plot_shares(summary: dict, path: Path) -> Path:
    plt = _pyplot()
    x = summary["bin_centers"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, group in zip(axes[:2], GROUPS):
        g = summary[group]
        ax.set_title(f"{group} responses (n={g['n']})")
        if g["n"]:
            for k in CLASSES[:OTHER]:
                ax.plot(x, [float("nan") if v is None else v for v in g["binned"][k]], marker="o", markersize=3,
                        color=COLORS[k], label=k)
        else:
            _empty(ax)
        ax.set_ylim(0, 1)
        ax.set_ylabel("attention share (of image + question + generated)")
    for group, style in zip(GROUPS, ("-", "--")):
        g = summary[group]
        if g["n"]:
            axes[2].plot(x, [float("nan") if v is None else v for v in g["binned"]["image"]], style, marker="o",
                         markersize=3, color=COLORS["image"], label=f"{group} (n={g['n']})")
    axes[2].set_title("image share: correct vs incorrect")
    axes[2].set_ylabel("image attention share")
    for ax in axes:
        ax.set_xlabel("normalised decoding step t / T")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("Final-layer attention allocation per decoding step (heads averaged)")
    return _save(fig, path)


def plot_late_early(summary: dict, ratios: torch.Tensor, correct: torch.Tensor, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    finite = ratios[torch.isfinite(ratios)].double()
    # The range stops at the 98th percentile (a response whose early image share is ~0 has a huge
    # ratio); larger values are drawn in the last bin.
    hi = max(1.0, float(finite.quantile(0.98))) * 1.05 if finite.numel() else 2.0
    bins = torch.linspace(0, hi, 21).tolist()
    for ax, group, rows, color in zip(axes, ("incorrect", "correct"), (~correct, correct), ("tab:orange", "tab:green")):
        v = ratios[rows]
        v = v[torch.isfinite(v)].clamp(max=hi).tolist()
        stats = summary[group].get("attention_late_early_ratio", {"mean": None, "n": 0})
        if v:
            ax.hist(v, bins=bins, color=color, alpha=0.7, edgecolor="black")
        else:
            _empty(ax)
        if stats["mean"] is not None:
            ax.axvline(stats["mean"], color="black", linestyle="--", label=f"mean {stats['mean']:.3f}")
            ax.legend(fontsize=8, loc="best")
        focus = summary[group].get("focus_late_early_ratio")
        focus_text = "n/a" if focus is None else f"{focus:.3f}"
        ax.set_title(f"{group} (n={stats['n']}); focus-score ratio {focus_text}")
        ax.set_xlabel("late/early image attention (second half / first half)")
        ax.set_ylabel("responses")
        ax.grid(alpha=0.3)
    fig.suptitle("Late/early visual accumulation ratio")
    return _save(fig, path)


def plot_focus(summary: dict, traces, per: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, (scatter, trace_ax) = plt.subplots(1, 2, figsize=(13, 4.2))
    mask, rho, image_attn = per["mask"], per["rho"], per["raw"][..., IMAGE]
    correct = torch.tensor([t.correct for t in traces])
    stride = max(1, int(mask.sum()) // MAX_POINTS)  # every stride-th token: a readable, fast scatter
    for group, rows, color in (("correct", correct, "tab:green"), ("incorrect", ~correct, "tab:orange")):
        sel = mask & rows.unsqueeze(-1)
        scatter.scatter(rho[sel][::stride], image_attn[sel][::stride], s=6, alpha=0.4, color=color, label=group)
    r = summary["all"]["pearson_r"]
    mean_r = "n/a" if r["mean"] is None else f"{r['mean']:.3f}"
    pooled = summary["all"]["pearson_r_pooled"]
    scatter.set_title(f"rho vs image attention: mean r {mean_r} over {r['n']} responses, "
                      f"pooled r {'n/a' if pooled is None else f'{pooled:.3f}'}", fontsize=9)
    scatter.set_xlabel("visual focus score rho_t")
    scatter.set_ylabel("final-layer attention mass on image tokens")
    scatter.grid(alpha=0.3)
    scatter.legend(fontsize=8)
    # The example: the longest response (the most steps to look at), as in figure 2(a).
    i = max(range(len(traces)), key=lambda j: traces[j].length)
    T = traces[i].length
    steps = torch.arange(1, T + 1)
    for c, k in enumerate(CLASSES[:OTHER]):
        trace_ax.plot(steps, per["renorm"][i, :T, c], color=COLORS[k], label=k, linewidth=1)
    trace_ax.set_ylim(0, 1)
    verdict = "correct" if traces[i].correct else "incorrect"
    trace_ax.set_xlabel(f"decoding step t of {traces[i].id} ({verdict}, T={T}): the longest response")
    trace_ax.set_ylabel("attention share")
    trace_ax.grid(alpha=0.3)
    twin = trace_ax.twinx()
    twin.plot(steps, rho[i, :T], color="black", linestyle=":", linewidth=1, label="rho")
    twin.set_ylabel("rho")
    lines = trace_ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    # above the axes: the curves fill the panel, any inside spot hides one of them
    trace_ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, ncol=4, loc="lower center",
                    bbox_to_anchor=(0.5, 1.0), frameon=False)
    return _save(fig, path)


def write_figures(summary: dict, traces, per: dict, out: Path) -> list[Path]:
    """The three PNGs of the module docstring in ``out``; [] with a warning without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        logger.warning("analysis: matplotlib is not installed (pip install matplotlib); no figures written")
        return []
    correct = torch.tensor([t.correct for t in traces])
    return [
        plot_shares(summary, out / "attention_shares.png"),
        plot_late_early(summary, per["attention_ratio"], correct, out / "late_early_ratio.png"),
        plot_focus(summary, traces, per, out / "focus_vs_attention.png"),
    ]
