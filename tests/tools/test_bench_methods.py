"""``tools/bench_vgpo_overhead.py``: argument parsing and config resolution, on the layout the quickstart
writes (``examples/quickstart_cpu.sh`` run with a fake ``python``, see ``tests/examples/quickstart_fakes``).
Nothing trains: the runs themselves need vLLM and minutes per step.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.examples.quickstart_fakes import REPO, run_quickstart


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vgpo_overhead", REPO / "tools" / "bench_vgpo_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quickstart_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("quickstart")
    run_quickstart(root)
    return root


def test_defaults_resolve_on_the_quickstart_files(bench, quickstart_root):
    args = bench.parse_args([])
    assert (args.config, args.steps, args.skip, args.repeats, args.nproc) == (
        "examples/configs/cpu_tiny.yaml", 12, 2, 2, 1)
    cfg = bench.resolve(args, root=quickstart_root)
    assert cfg.model.hf_path == "outputs/tiny-qwen25vl"
    assert cfg.data.train_files == ["outputs/synthetic_quickstart/train.parquet"]
    assert (cfg.algorithm.shaping, cfg.trainer.total_steps, cfg.trainer.val_interval, cfg.optimizer.lr) == (
        "vgpo", 12, 0, 1e-12)


def test_user_overrides_win(bench, quickstart_root):
    args = bench.parse_args(["--steps", "5", "--skip", "1", "optimizer.lr=0.001", "rollout.n=4"])
    cfg = bench.resolve(args, root=quickstart_root)
    assert (cfg.trainer.total_steps, cfg.optimizer.lr, cfg.rollout.n) == (5, 0.001, 4)


def test_missing_files_stop_before_any_run(bench, tmp_path):
    """The issue's first failure (the quickstart not run, or its files elsewhere): an exit that says
    what is missing and what to do, before the first run starts."""
    config = tmp_path / "examples" / "configs" / "cpu_tiny.yaml"
    config.parent.mkdir(parents=True)
    config.write_text((REPO / "examples" / "configs" / "cpu_tiny.yaml").read_text())
    with pytest.raises(SystemExit) as e:
        bench.resolve(bench.parse_args([]), root=tmp_path)
    message = str(e.value)
    assert "outputs/tiny-qwen25vl (model.hf_path)" in message
    assert "outputs/synthetic_quickstart/val_blank.parquet (data.val_files)" in message
    assert "bash examples/quickstart_cpu.sh" in message


@pytest.mark.parametrize("argv,expected", [
    (["--steps", "2", "--skip", "2"], "must exceed --skip"),
    (["algorithm.vgpo.bta=0.5"], "unknown key"),
])
def test_bad_arguments_exit_with_the_reason(bench, quickstart_root, capsys, argv, expected):
    with pytest.raises(SystemExit) as e:
        bench.resolve(bench.parse_args(argv), root=quickstart_root)
    assert expected in str(e.value) + capsys.readouterr().err
