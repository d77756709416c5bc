"""The paper's aggregate columns and the results files: pure functions of per-benchmark accuracies.

- Avg-Math: mean of MathVista, MathVerse, WeMath, MMK12, GeoMath, Geo3k;
- Avg-Vision: mean of LogicVista, Counting, MMMU-Pro, MathVerse-V;
- Overall: mean of all ten benchmarks (NOT the mean of the two averages; VGPO's row of table 1 gives
  Avg-Math 66.6, Avg-Vision 63.3, Overall 65.3).

Means are taken over the unrounded accuracies and rounded half-up to one decimal for display, as
the paper rounds (63.25 -> 63.3; Python's ``round`` would give 63.2). With fewer than all ten
benchmarks the averages are over those present and the header says so (``Avg-Math (2/6)``); an
average with none of its benchmarks, and a missing benchmark's column, show ``-``. The markdown
table always has the ten columns in the paper's order.
"""

from __future__ import annotations

import csv
import io
import json
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Mapping, Optional

from megatron_vgpo.evaluation.benchmarks import BENCHMARKS, BY_KEY

AVERAGES = {
    "Avg-Math": [b.key for b in BENCHMARKS if b.group == "math"],
    "Avg-Vision": [b.key for b in BENCHMARKS if b.group == "vision"],
    "Overall": [b.key for b in BENCHMARKS],
}


def averages(accuracy: Mapping[str, float]) -> dict[str, Optional[float]]:
    """``{"Avg-Math", "Avg-Vision", "Overall"}`` -> mean accuracy over the benchmarks present (None: none)."""
    out = {}
    for name, keys in AVERAGES.items():
        present = [accuracy[k] for k in keys if k in accuracy]
        out[name] = sum(present) / len(present) if present else None
    return out


def fmt(value: Optional[float], digits: int = 1) -> str:
    """Half-up rounding of a percentage; ``-`` for None. The value is first rounded to 9 decimals so
    that float noise (253.0 / 4 computed as 63.2499999...) cannot move it across the half."""
    if value is None:
        return "-"
    exact = Decimal(repr(round(value, 9)))
    return str(exact.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def _average_header(name: str, accuracy: Mapping[str, float]) -> str:
    keys = AVERAGES[name]
    present = sum(k in accuracy for k in keys)
    return name if present in (0, len(keys)) else f"{name} ({present}/{len(keys)})"


def _custom(accuracy: Mapping[str, float]) -> list[str]:
    """Benchmarks of the user's own (not among the ten), in the order measured."""
    return [k for k in accuracy if k not in BY_KEY]


def markdown_table(accuracy: Mapping[str, float], label: str = "model") -> str:
    """One row: the ten benchmarks in the paper's order, then Avg-Math, Avg-Vision, Overall, then any
    benchmark of the user's own (in no average)."""
    avg = averages(accuracy)
    custom = _custom(accuracy)
    header = (["model"] + [b.column for b in BENCHMARKS] + [_average_header(n, accuracy) for n in AVERAGES]
              + custom)
    row = ([label] + [fmt(accuracy.get(b.key)) for b in BENCHMARKS] + [fmt(avg[n]) for n in AVERAGES]
           + [fmt(accuracy[k]) for k in custom])
    rule = "|---|" + "---:|" * (len(header) - 1)
    return "\n".join(["| " + " | ".join(header) + " |", rule, "| " + " | ".join(row) + " |"])


def results_csv(per_benchmark: Mapping[str, dict], accuracy: Mapping[str, float]) -> str:
    """``name,column,accuracy,items,samples,correct,skipped``: the benchmarks present, then the averages."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["name", "column", "accuracy", "items", "samples", "correct", "skipped"])
    for key, column in [(b.key, b.column) for b in BENCHMARKS] + [(k, k) for k in per_benchmark if k not in BY_KEY]:
        if key in per_benchmark:
            r = per_benchmark[key]
            w.writerow([key, column, fmt(r["accuracy"], 4), r["items"], r["samples"], r["correct"],
                        sum(r["skipped"].values())])
    for name, value in averages(accuracy).items():
        w.writerow([name, _average_header(name, accuracy), fmt(value, 4), "", "", "", ""])
    return buf.getvalue()


def write_results(output: Path, per_benchmark: Mapping[str, dict], settings: dict, label: str) -> str:
    """Write ``results.json`` and ``results.csv`` into ``output``; returns the markdown table."""
    accuracy = {k: r["accuracy"] for k, r in per_benchmark.items() if r["accuracy"] is not None}
    table = markdown_table(accuracy, label)
    payload = {"settings": settings, "benchmarks": dict(per_benchmark), "averages": averages(accuracy),
               "table": table}
    (output / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    (output / "results.csv").write_text(results_csv(per_benchmark, accuracy))
    return table
