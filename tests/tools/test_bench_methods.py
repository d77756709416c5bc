"""``tools/bench_methods.py``: argument parsing, config resolution and the report, on the layout the quickstart
writes (``examples/quickstart_cpu.sh`` run with a fake ``python``, see ``tests/examples/quickstart_fakes``).
Nothing trains: the runs themselves need vLLM and minutes per step.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests.examples.quickstart_fakes import REPO, run_quickstart


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_methods", REPO / "tools" / "bench_methods.py")
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
    assert (cfg.algorithm.shapers, cfg.trainer.total_steps, cfg.trainer.val_interval, cfg.optimizer.lr) == (
        ["vppo"], 12, 0, 1e-12)
    assert args.methods == ["dapo", "vgpo", "entropy", "vppo", "papo"]


def test_methods_order_and_report(bench):
    """DAPO always runs first in the list; the order rotates and reverses between repeats; the report
    divides by DAPO and sets the target by the number of extra views (hand numbers: DAPO step 2 s with a
    0.5 s pi_old pass -> a one-view method may take 1 + 0.25 + 0.02 = 1.27 x). ``x DAPO*`` takes the
    shared phases at DAPO's time: vgpo's step 2.22 s holds a rollout 0.2 s slower than DAPO's 1.0 s ->
    2.02 / 2 = 1.010 (met), where the raw ratio 1.110 would not be."""
    assert bench.parse_args(["--methods", "vppo"]).methods == ["dapo", "vppo"]
    assert bench.run_order(["dapo", "vgpo", "vppo"], 2) == ["dapo", "vgpo", "vppo", "dapo", "vppo", "vgpo"]
    times = {"dapo": {"step": [2.0], "rollout": [1.0], "logprob": [0.5]},
             "vgpo": {"step": [2.22], "rollout": [1.2], "logprob": [0.5]},
             "vppo": {"step": [2.6], "rollout": [1.0], "logprob": [0.5], "extra_views": [0.5]}}
    lines = bench.report(times)
    assert lines[1].split()[0] == "dapo" and lines[1].split()[-4:] == ["1.000", "1.000", "1.020", "yes"]
    assert lines[2].split()[-4:] == ["1.110", "1.010", "1.020", "yes"]
    assert lines[3].split()[-4:] == ["1.300", "1.300", "1.270", "NO"]


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
