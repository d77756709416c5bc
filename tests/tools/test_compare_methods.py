"""``tools/compare_methods.py``: the training commands (same start, the method's preset, the seed in every
stream), resuming (finished runs are not run again), and the table's cells (mean ± population std)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare_methods", REPO / "tools" / "compare_methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_commands_and_resume(compare, tmp_path):
    args = compare.parse_args(["--out", str(tmp_path), "--methods", "dapo", "vppo", "--seeds", "0", "3",
                               "trainer.total_steps=5"])
    cmds = compare.train_commands(args, tmp_path / "model", tmp_path / "data")
    assert sorted(cmds) == ["dapo_s0", "dapo_s3", "vppo_s0", "vppo_s3"]
    vppo = cmds["vppo_s3"]
    assert f"model.hf_path={tmp_path / 'model'}" in vppo  # the same start for every run
    assert {"trainer.seed=3", "rollout.seed=3", "data.seed=3", "algorithm.shapers=[vppo]"} <= set(vppo)
    assert vppo[-1] == "trainer.total_steps=5"  # the user's overrides last: they win
    (tmp_path / "ckpt" / "dapo_s0").mkdir(parents=True)
    (tmp_path / "ckpt" / "dapo_s0" / "latest").write_text("step_00000005\n")
    (tmp_path / "tb" / "dapo_s0").mkdir(parents=True)
    (tmp_path / "tb" / "dapo_s0" / "done").write_text("1 s\n")
    assert "dapo_s0" not in compare.train_commands(args, tmp_path / "model", tmp_path / "data")


def test_table_cells_by_hand(compare):
    """accuracy 80, 90 -> mean 85, population std 5; a NaN (never reached 50%) is left out; one seed: no ±."""
    runs = {"dapo_s0": {"accuracy": 80.0, "blank": 25.0, "steps_to_50": 150, "part_1": 90.0},
            "dapo_s1": {"accuracy": 90.0, "blank": 25.0, "steps_to_50": float("nan"), "part_1": 70.0}}
    lines = compare.table(runs, ["dapo"], [0, 1]).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    row = dict(zip(header, [c.strip() for c in lines[2].strip("|").split("|")]))
    assert row["val acc %"] == "85.0 ± 5.0" and row["blank %"] == "25.0 ± 0.0" and row["part 1 %"] == "80.0 ± 10.0"
    assert row["steps to 50%"] == "150" and row["Pearson r"] == "-"
    assert compare._cell([1.0], 2) == "1.00" and compare._cell([math.nan], 1) == "-"
