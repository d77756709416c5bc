"""Visual-attention analysis of a model's responses (the VGPO paper's figure 2 and appendix C).

    python -m megatron_vgpo.analysis.attention --model DIR --data FILE --output DIR

``--data`` is an evaluation JSONL (responses given) or a dataset file (responses generated greedily
with HF and graded); ``analysis/inputs.py`` documents both. Every response is teacher-forced once
(``analysis/trace.py``); this file aggregates the traces and writes:

- ``attention.json``: ``config``, ``summary`` (see ``summarise``) and ``responses`` (per response: id,
  benchmark, correct, T, per-step shares renormalised over image/question/generated, the raw four-way
  shares, rho, both late/early quantities and the Pearson r);
- ``attention_shares.png``, ``late_early_ratio.png``, ``focus_vs_attention.png`` (``analysis/figures.py``);

and prints the headline numbers per group (all, correct, incorrect).

Aggregates weigh responses equally: per-bin means are means over responses of each response's bin
mean; ratios and r are per response, then averaged, except the focus-score ratio, which is the
released code's ratio of means.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import torch

from megatron_vgpo.algorithms.vgpo import visual_token_fractions
from megatron_vgpo.analysis.metrics import (
    CLASSES, IMAGE, OTHER, attention_late_early_ratio, binned_means, focus_late_early_ratio, pearson_r,
    renormalised_shares,
)
from megatron_vgpo.analysis.trace import ResponseTrace

JSON_FILE = "attention.json"
BINNED_KEYS = ("image", "question", "generated", "other")
"""Per-bin series: the three renormalised shares, then the raw share of "other"."""


def pad_traces(traces: Sequence[ResponseTrace]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded batch of the traces: (raw shares [B, L, 4], rho [B, L], response_mask [B, L])."""
    L = max(t.length for t in traces)
    shares = torch.zeros(len(traces), L, len(CLASSES))
    rho = torch.zeros(len(traces), L)
    mask = torch.zeros(len(traces), L, dtype=torch.bool)
    for i, t in enumerate(traces):
        shares[i, :t.length], rho[i, :t.length], mask[i, :t.length] = t.shares, t.rho, True
    return shares, rho, mask


def _num(x) -> float | None:
    """A JSON number (NaN -> null), rounded to 6 decimals."""
    x = float(x)
    return None if not math.isfinite(x) else round(x, 6)


def _stats(values: torch.Tensor) -> dict:
    v = values[torch.isfinite(values)].double()
    if not v.numel():
        return {"mean": None, "median": None, "n": 0}
    return {"mean": _num(v.mean()), "median": _num(v.quantile(0.5)), "n": int(v.numel())}


def _token_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each response's tokens: x [B, L, C], mask [B, L] -> [B, C]."""
    return (x * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def summarise(traces: Sequence[ResponseTrace], n_bins: int = 20, top_fraction: float = 0.4) -> tuple[dict, dict]:
    """(summary dict, per-response tensors) over the traces.

    summary: ``n_responses``, ``n_bins``, ``bin_centers``; per group (``all``, ``correct``,
    ``incorrect``): ``n``, ``binned`` (``BINNED_KEYS`` -> n_bins means), ``mean_shares`` (the three
    renormalised shares and the raw four, each a mean over responses of the response's token mean),
    ``attention_late_early_ratio`` (mean/median/n over responses), ``focus_late_early_ratio``,
    ``pearson_r`` (mean/median/n over responses) and ``pearson_r_pooled`` (over all tokens).
    """
    raw, rho, mask = pad_traces(traces)
    renorm = renormalised_shares(raw)
    per = {
        "renorm": renorm, "raw": raw, "rho": rho, "mask": mask,
        "attention_ratio": attention_late_early_ratio(renorm[..., IMAGE], mask),
        "focus_fractions": visual_token_fractions(rho, mask, top_fraction),
        "pearson_r": pearson_r(rho, raw[..., IMAGE], mask),
        "binned": binned_means(torch.cat([renorm, raw[..., OTHER:]], dim=-1), mask, n_bins),
    }
    correct = torch.tensor([t.correct for t in traces])
    groups = {"all": torch.ones_like(correct), "correct": correct, "incorrect": ~correct}
    summary = {"n_responses": len(traces), "n_bins": n_bins,
               "bin_centers": [round((b + 0.5) / n_bins, 6) for b in range(n_bins)]}
    for name, rows in groups.items():
        g = {"n": int(rows.sum())}
        if g["n"]:
            binned = per["binned"][rows].nanmean(0)
            renorm_mean, raw_mean = _token_mean(renorm, mask)[rows].mean(0), _token_mean(raw, mask)[rows].mean(0)
            pooled = mask & rows.unsqueeze(-1)
            g.update(
                binned={k: [_num(v) for v in binned[:, c]] for c, k in enumerate(BINNED_KEYS)},
                mean_shares={**{k: _num(renorm_mean[c]) for c, k in enumerate(CLASSES[:OTHER])},
                             **{f"raw_{k}": _num(raw_mean[c]) for c, k in enumerate(CLASSES)}},
                attention_late_early_ratio=_stats(per["attention_ratio"][rows]),
                focus_late_early_ratio=_num(focus_late_early_ratio(rho[rows], mask[rows], top_fraction)),
                pearson_r=_stats(per["pearson_r"][rows]),
                pearson_r_pooled=_num(pearson_r(rho[pooled][None], raw[..., IMAGE][pooled][None],
                                                torch.ones(1, int(pooled.sum()), dtype=torch.bool))[0]),
            )
        summary[name] = g
    return summary, per


def response_records(traces: Sequence[ResponseTrace], per: dict) -> list[dict]:
    """The per-response part of ``attention.json``."""
    f_early, f_late = per["focus_fractions"]
    records = []
    for i, t in enumerate(traces):
        T = t.length
        records.append({
            "id": t.id, "benchmark": t.benchmark, "correct": t.correct, "T": T,
            "shares": {k: [_num(v) for v in per["renorm"][i, :T, c]] for c, k in enumerate(CLASSES[:OTHER])},
            "raw_shares": {k: [_num(v) for v in per["raw"][i, :T, c]] for c, k in enumerate(CLASSES)},
            "rho": [_num(v) for v in t.rho],
            "attention_late_early_ratio": _num(per["attention_ratio"][i]),
            "focus_fraction_early": _num(f_early[i]), "focus_fraction_late": _num(f_late[i]),
            "pearson_r": _num(per["pearson_r"][i]),
        })
    return records


def report(summary: dict) -> str:
    """A few console lines: per group, n and the headline numbers."""
    lines = []
    for group in ("all", "correct", "incorrect"):
        g = summary[group]
        if not g["n"]:
            lines.append(f"{group:>9}: n=0")
            continue
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"{group:>9}: n={g['n']}  image share {fmt(g['mean_shares']['image'])}  "
                     f"late/early attention {fmt(g['attention_late_early_ratio']['mean'])}  "
                     f"focus {fmt(g['focus_late_early_ratio'])}  r(rho, image attention) {fmt(g['pearson_r']['mean'])}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m megatron_vgpo.analysis.attention", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="HF Qwen2.5-VL checkpoint directory.")
    p.add_argument("--data", required=True, help="Evaluation JSONL (with 'response') or an EasyR1-schema dataset "
                   "file (parquet/json/jsonl with problem/answer/images): responses are then generated.")
    p.add_argument("--output", required=True, help="Directory for attention.json and the PNG figures.")
    p.add_argument("--limit", type=int, default=None, help="Analyse at most this many rows.")
    p.add_argument("--max-new-tokens", type=int, default=2048, help="Generation length limit (dataset input).")
    p.add_argument("--grader", default="mathruler", choices=("mathruler", "math_verify"),
                   help="Grader for generated responses (and JSONL rows without 'correct').")
    p.add_argument("--image-dir", default="", help="Relative image paths resolve here (default: the data file's folder).")
    p.add_argument("--min-pixels", type=int, default=None, help="Images are resized to at least this many pixels "
                   "(default: the evaluation's run.json beside --data, else 262144, the paper's evaluation).")
    p.add_argument("--max-pixels", type=int, default=None, help="... and at most this many (default: run.json, "
                   "else 1000000).")
    p.add_argument("--bins", type=int, default=20, help="Normalised-step bins of the share curves.")
    p.add_argument("--top-fraction", type=float, default=0.4, help="Top fraction of tokens by rho marked visual "
                   "in the focus-score late/early ratio.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="Model dtype (default: bfloat16 on a GPU, float32 on the CPU).")
    p.add_argument("--no-figures", action="store_true", help="Write only attention.json.")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the analysis; returns the summary (also written to ``OUTPUT/attention.json``)."""
    from megatron_vgpo.analysis.inputs import is_evaluation_file, iter_evaluation, iter_generated, pixel_bounds
    from megatron_vgpo.analysis.trace import load_model, trace_response
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor

    args = build_parser().parse_args(argv)
    args.min_pixels, args.max_pixels = pixel_bounds(args.data, args.min_pixels, args.max_pixels)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    processor = load_processor(args.model)
    model = load_model(args.model, device, dtype)
    common = dict(image_dir=args.image_dir, min_pixels=args.min_pixels, max_pixels=args.max_pixels,
                  grader=args.grader, limit=args.limit)
    if is_evaluation_file(args.data):
        items = iter_evaluation(args.data, processor, **common)
    else:
        items = iter_generated(args.data, model, processor, max_new_tokens=args.max_new_tokens, **common)
    traces = [trace_response(model, processor, item) for item in items]
    if not traces:
        raise SystemExit(f"no usable responses in {args.data}")
    summary, per = summarise(traces, args.bins, args.top_fraction)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "no_figures"} | {"dtype": str(dtype).split(".")[-1]}
    doc = {"config": config, "summary": summary, "responses": response_records(traces, per)}
    (out / JSON_FILE).write_text(json.dumps(doc) + "\n", encoding="utf-8")  # compact: per-step lists are long
    if not args.no_figures:
        from megatron_vgpo.analysis.figures import write_figures

        write_figures(summary, traces, per, out)
    print(f"{len(traces)} responses -> {out / JSON_FILE}\n{report(summary)}")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    main()
