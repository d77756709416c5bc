"""MetricsLogger (TensorBoard scalars read back, config.yaml, resume purge, console progress),
StepTimer and the throughput / MFU formulas."""

from __future__ import annotations

import importlib.util
import io
import logging
import math

import pytest
import torch

from megatron_vgpo.config.schema import LoggingConfig
from megatron_vgpo.training.logging import (
    MetricsLogger,
    StepTimer,
    device_peak_flops,
    flops_per_token,
    perf_metrics,
    plot_scalars,
    read_scalars,
)

CONFIG_YAML = "trainer:\n  total_steps: 4\n"


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def metrics_logger(tmp_path, rank=0, stream=None, start_step=0, **cfg) -> MetricsLogger:
    cfg = LoggingConfig(tensorboard_dir=str(tmp_path / "runs"), run_name="unit", **cfg)
    return MetricsLogger(cfg, rank, CONFIG_YAML, total_steps=4, start_step=start_step, stream=stream or io.StringIO())


def test_scalars_round_trip_through_event_files(tmp_path, caplog):
    with caplog.at_level(logging.WARNING), metrics_logger(tmp_path) as m:
        m.log(1, {"actor/pg_loss": 0.5, "reward/accuracy": torch.tensor(0.25), "batch/kept_groups": 3})
        m.log(2, {"actor/pg_loss": float("nan"), "reward/accuracy": 0.75})
        m.log(3, {"actor/pg_loss": float("nan")})
    scalars = read_scalars(m.logdir)
    assert scalars["reward/accuracy"] == [(1, 0.25), (2, 0.75)]
    assert scalars["batch/kept_groups"] == [(1, 3.0)]
    assert [s for s, _ in scalars["actor/pg_loss"]] == [1, 2, 3] and math.isnan(scalars["actor/pg_loss"][1][1])
    assert sum("actor/pg_loss is nan" in r.getMessage() for r in caplog.records) == 1  # once per tag
    assert (m.logdir / "config.yaml").read_text() == CONFIG_YAML


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    with metrics_logger(tmp_path) as m:
        for step in range(1, 5):
            m.log(step, {"x": float(step)})  # the killed run got to step 4; its checkpoint was step 2
    with metrics_logger(tmp_path, start_step=2) as m:
        for step in range(3, 6):
            m.log(step, {"x": 10.0 * step})
    assert read_scalars(m.logdir)["x"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0), (5, 50.0)]
    with metrics_logger(tmp_path) as m:  # built before the resume, as the trainer does
        m.resume_at(4)
        m.log(5, {"x": 500.0})
    assert read_scalars(m.logdir)["x"][-2:] == [(4, 40.0), (5, 500.0)]


def test_plain_progress_lines_on_a_pipe(tmp_path):
    stream = io.StringIO()
    with metrics_logger(tmp_path, stream=stream, log_interval=2) as m:
        for step in range(1, 5):
            m.log(step, {"reward/accuracy": step / 4, "actor/pg_loss": -0.1})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("step 2/4 (50%) | ") and "s/step | ETA 0:00:0" in lines[0]
    assert lines[1].endswith("| reward 1 | pg_loss -0.1") and "step 4/4 (100%)" in lines[1]


def test_progress_line_shows_each_validation_dataset_not_the_pooled_mean(tmp_path):
    stream = io.StringIO()
    with metrics_logger(tmp_path, stream=stream) as m:
        m.log(4, {"val/accuracy": 0.57, "val/accuracy/val": 0.89, "val/accuracy/val_blank": 0.25})
    line = stream.getvalue().strip()
    assert line.endswith("| val 0.89 | val_blank 0.25"), line
    assert "0.57" not in line


def test_progress_line_before_the_first_step_and_tensorboard_only_logging(tmp_path):
    """Validation before training shows no rate (no step timed yet); a warm-up logs to TensorBoard without
    printing RL progress lines; a dataset whose name does not say 'val' is labelled so."""
    stream = io.StringIO()
    with metrics_logger(tmp_path, stream=stream) as m:
        m.log(0, {"val/accuracy/mmk12": 0.5})
        m.log(1, {"warmup/nll": 3.0}, progress=False)
    assert stream.getvalue().splitlines() == ["step 0/4 (0%) | val mmk12 0.5"]
    assert read_scalars(m.logdir)["warmup/nll"] == [(1, 3.0)]


def test_progress_bar_on_a_terminal_and_silence_when_off(tmp_path):
    tty = FakeTTY()
    with metrics_logger(tmp_path, stream=tty) as m:
        m.resume_at(1)
        m.log(2, {"reward/accuracy": 0.5})
        m.log(3, {"reward/accuracy": 0.5})
    assert "3/4" in tty.getvalue() and "reward=0.5" in tty.getvalue()
    quiet = io.StringIO()
    with metrics_logger(tmp_path, stream=quiet, progress_bar=False) as m:
        m.log(1, {"reward/accuracy": 0.5})
    assert quiet.getvalue() == ""


def test_only_rank_zero_writes(tmp_path):
    stream = io.StringIO()
    with metrics_logger(tmp_path, rank=1, stream=stream) as m:
        m.log(1, {"x": 1.0})
    assert not (tmp_path / "runs").exists() and stream.getvalue() == ""


def test_non_numeric_metrics_are_named_errors(tmp_path):
    with metrics_logger(tmp_path) as m:
        with pytest.raises(TypeError, match="metric 'val/accuracy' is str"):
            m.log(1, {"val/accuracy": "high"})
        with pytest.raises(TypeError, match=r"'x' is a tensor of shape \(2,\)"):
            m.log(1, {"x": torch.ones(2)})


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch, caplog):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a))
    with caplog.at_level(logging.WARNING):
        assert plot_scalars(tmp_path, ["x"], tmp_path / "x.png") is None
    assert "matplotlib is not installed" in caplog.text and not (tmp_path / "x.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is optional and not installed")
def test_plot_writes_a_png(tmp_path):
    with metrics_logger(tmp_path) as m:
        for step in range(1, 4):
            m.log(step, {"val/accuracy": step / 3, "reward/accuracy": 0.5})
    out = plot_scalars(m.logdir, ["val/accuracy", "reward/accuracy"], tmp_path / "curve.png", title="unit")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_timer_accumulates_and_nests():
    timer = StepTimer(synchronize=False)
    with timer("step"):
        with timer("rollout"):
            pass
        assert timer.time("rollout", max, 1, 2) == 2  # a refill: the same section again
    seconds = timer.metrics()
    assert set(seconds) == {"timing_s/step", "timing_s/rollout"}
    assert 0 <= seconds["timing_s/rollout"] <= seconds["timing_s/step"]
    assert timer.metrics() == {}  # reset after reading


def test_flops_and_mfu_formulas():
    # N = 1e9, L = 2, d = 1000, T = 500: 6N + 12 L d T = 6e9 + 1.2e7; forward only: 2e9 + 4e6.
    assert flops_per_token(10**9, 2, 1000, 500) == 6e9 + 1.2e7
    assert flops_per_token(10**9, 2, 1000, 500, backward=False) == 2e9 + 4e6
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12 == device_peak_flops("NVIDIA H200")
    assert device_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12 and device_peak_flops("Tesla T4") is None
    perf = perf_metrics(1000, 2.0, model_flops=989e12, num_devices=4, peak_flops=989e12)
    assert perf == {"perf/tokens_per_s": 500.0, "perf/mfu": 0.125}
    if not torch.cuda.is_available():
        assert perf_metrics(1000, 2.0, model_flops=1e12) == {"perf/tokens_per_s": 500.0}  # no MFU on CPU


def test_plot_scalars_tool_prints_the_table_and_names_missing_tags(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    with metrics_logger(tmp_path) as m:
        m.log(1, {"val/accuracy": 0.25})
        m.log(2, {"val/accuracy": 0.5, "reward/accuracy": 0.75})
    tool = [sys.executable, str(REPO / "tools" / "plot_scalars.py"), str(m.logdir)]
    out = subprocess.run([*tool, "val/accuracy", "reward/accuracy"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    assert rows == [["1", "0.2500"], ["2", "0.5000", "0.7500"]]
    bad = subprocess.run([*tool, "val/nope"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "val/nope" in bad.stderr and "val/accuracy" in bad.stderr
