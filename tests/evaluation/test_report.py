"""Aggregate columns as the paper computes them, checked on its own table 1 (VGPO row), and the table."""

from __future__ import annotations

import pytest

from megatron_vgpo.evaluation import BENCHMARKS, averages, fmt, markdown_table

# VGPO, Qwen2.5-VL-7B, table 1: six math benchmarks | four vision-dependent ones -> 66.6, 63.3, 65.3.
PAPER_VGPO = dict(zip([b.key for b in BENCHMARKS], [74.1, 71.6, 72.5, 81.5, 54.3, 45.8, 49.4, 95.5, 40.5, 67.6]))


def test_paper_vgpo_row():
    avg = averages(PAPER_VGPO)
    assert [fmt(avg[k]) for k in ("Avg-Math", "Avg-Vision", "Overall")] == ["66.6", "63.3", "65.3"]
    # Overall is the mean of the ten, not of the two averages (that would be 64.9).
    assert fmt((avg["Avg-Math"] + avg["Avg-Vision"]) / 2) == "64.9"
    assert markdown_table(PAPER_VGPO, "VGPO").splitlines()[2] == (
        "| VGPO | 74.1 | 71.6 | 72.5 | 81.5 | 54.3 | 45.8 | 49.4 | 95.5 | 40.5 | 67.6 | 66.6 | 63.3 | 65.3 |")


def test_half_up_rounding():
    assert [fmt(v) for v in (63.25, 253.0 / 4, 0.05, 12.349999, 100.0, 0.0)] == [
        "63.3", "63.3", "0.1", "12.3", "100.0", "0.0"]
    assert round(63.25, 1) == 63.2  # why fmt does not use round()
    assert fmt(None) == "-" and fmt(2 / 3 * 100, 4) == "66.6667"


def test_partial_benchmarks():
    acc = {"mathvista": 50.0, "geo3k": 70.0}
    assert averages(acc) == {"Avg-Math": 60.0, "Avg-Vision": None, "Overall": 60.0}
    header, _, row = markdown_table(acc).splitlines()
    assert header.endswith("| Avg-Math (2/6) | Avg-Vision | Overall (2/10) |")
    assert row == "| model | 50.0 | - | - | - | - | 70.0 | - | - | - | - | 60.0 | - | 60.0 |"
    assert averages({}) == {"Avg-Math": None, "Avg-Vision": None, "Overall": None}


def test_all_ten_columns_in_paper_order():
    header = markdown_table(PAPER_VGPO).splitlines()[0]
    assert header == ("| model | MathVista | MathVerse | WeMath | MMK12 | GeoMath | Geo3k | LogicVista | Counting | "
                      "MMMU-Pro | MathVerse-V | Avg-Math | Avg-Vision | Overall |")
    assert averages(PAPER_VGPO)["Overall"] == pytest.approx(65.28)


def test_custom_benchmarks_get_their_own_columns_outside_the_averages():
    """A file of the user's own (``--files val=...``): its column after the paper's, in no average."""
    from megatron_vgpo.evaluation.benchmarks import parse_file_overrides, select
    from megatron_vgpo.evaluation.report import markdown_table

    files = parse_file_overrides(["geo3k=/d/g.parquet", "val=/d/val.parquet", "val_blank=/d/b.parquet"])
    assert set(files) == {"geo3k", "val", "val_blank"}
    chosen = select(["val", "geo3k", "val_blank"], custom=files)
    assert [b.key for b in chosen] == ["geo3k", "val", "val_blank"] and chosen[1].group == "custom"
    header, _, row = markdown_table({"geo3k": 50.0, "val": 80.0, "val_blank": 25.0}).splitlines()
    assert header.split(" | ")[-2:] == ["val", "val_blank |"]
    cells = [c.strip() for c in row.strip("| ").split("|")]
    assert cells[-5:] == ["50.0", "-", "50.0", "80.0", "25.0"]  # Avg-Math (1/6), Avg-Vision, Overall, val, val_blank
