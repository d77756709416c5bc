"""``examples/quickstart_cpu.sh`` writes its files where ``examples/configs/cpu_tiny.yaml`` reads them.

One source of truth for the quickstart's paths: with the default ``OUT`` the trainer's path overrides
are exactly the config's values, so a tool that reads the config alone (``tools/bench_methods.py``)
finds the quickstart's files. The script runs for real under bash, with a fake ``python`` (see
``quickstart_fakes``); no model is built and nothing trains.
"""

from __future__ import annotations

from pathlib import Path

from megatron_vgpo.config import load_config
from tests.examples.quickstart_fakes import CONFIG, run_quickstart

PATH_KEYS = (("model", "hf_path"), ("data", "train_files"), ("data", "val_files"),
             ("logging", "tensorboard_dir"), ("checkpoint", "save_dir"))


def _paths(cfg) -> dict:
    return {f"{section}.{key}": getattr(getattr(cfg, section), key) for section, key in PATH_KEYS}


def _trainer_call(calls: list[dict]) -> list[str]:
    *_, trainer = calls
    assert trainer["argv"][:4] == ["-m", "megatron_vgpo.train", "--config", str(CONFIG)], trainer
    return trainer["argv"][4:]


def test_default_layout_is_the_configs(tmp_path):
    calls = run_quickstart(tmp_path, "trainer.total_steps=6")
    overrides = _trainer_call(calls)
    assert overrides[-1] == "trainer.total_steps=6"  # the user's arguments come last and win
    with_overrides = _paths(load_config(str(tmp_path / CONFIG), overrides))
    assert with_overrides == _paths(load_config(str(tmp_path / CONFIG)))
    # ... and the files the tools wrote are there, relative to the repository the trainer starts in.
    for path in (with_overrides["model.hf_path"], *with_overrides["data.train_files"],
                 *with_overrides["data.val_files"]):
        assert (tmp_path / path).exists(), path
    assert [c["cwd"] for c in calls] == [str(tmp_path)] * len(calls)


def test_another_out_moves_every_path(tmp_path):
    out = tmp_path / "elsewhere"
    overrides = _trainer_call(run_quickstart(tmp_path / "repo", out=str(out)))
    paths = _paths(load_config(str(tmp_path / "repo" / CONFIG), overrides))
    flat = [paths["model.hf_path"], *paths["data.train_files"], *paths["data.val_files"],
            paths["logging.tensorboard_dir"], paths["checkpoint.save_dir"]]
    assert all(Path(p).is_relative_to(out) for p in flat), paths
    assert all(Path(p).exists() for p in flat[:4])
    assert not (tmp_path / "repo" / "outputs").exists()


def test_second_run_reuses_the_files(tmp_path):
    run_quickstart(tmp_path)
    calls = run_quickstart(tmp_path)
    assert calls[-1]["argv"][:2] == ["-m", "megatron_vgpo.train"]
    assert sum(c["argv"][0].startswith("tools/") for c in calls) == 2  # the first run's two tools only
