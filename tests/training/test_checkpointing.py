"""CheckpointManager in one process (a world of one): bit-exact round trip, exact resume, crash
safety at every phase of a save, keep_last, and named errors for incomplete checkpoints.

The multi-rank layout change and a real SIGKILL are in ``test_checkpoint_processes.py``.
"""

from __future__ import annotations

import json
import logging
import random

import numpy as np
import pytest
import torch

from megatron_vgpo.config.schema import CheckpointConfig
from megatron_vgpo.training.checkpointing import (
    LATEST,
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    step_dir_name,
)
from tests.training.tiny_loop import TinyData, build, global_tensors, seed_all, train_step


class Crash(BaseException):
    """Stands in for a SIGKILL at a save phase: nothing after the hook runs, no cleanup happens."""


def manager(tmp_path, phase_hook=None, **kw) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(save_dir=str(tmp_path / "ckpt"), **kw), rank=0, world_size=1,
                             phase_hook=phase_hook)


def run_steps(run, data, steps, ckpt=None, save_at=()):
    metrics = {}
    for step in steps:
        metrics[step] = train_step(run, data)
        if step in save_at:
            ckpt.save(step, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict(),
                      extra={"metrics": metrics[step]})
    return metrics


def full_state(run) -> dict:
    sharded = run.model.sharded_state_dict()
    return global_tensors({"model": sharded, "optimizer": run.optimizer.sharded_state_dict(sharded)})


def test_round_trip_is_bit_exact(world_of_one, tmp_path):
    run, data = build(world_of_one, init_seed=0), TinyData(seed=3)
    run_steps(run, data, range(1, 3))
    ckpt = manager(tmp_path)
    random.seed(5), np.random.seed(5)
    rng_before = capture_rng_state()
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    (hf_dir / "model.safetensors").write_bytes(b"weights")
    path = ckpt.save(2, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict(), {"k": 1},
                     hf_config_dir=hf_dir)
    assert [p.name for p in (path / "hf_config").iterdir()] == ["config.json"]  # for megatron_to_hf.py
    assert torch.equal(torch.get_rng_state(), rng_before["torch_cpu"]), "a save must not move the RNG"
    saved = full_state(run)

    other = build(world_of_one, init_seed=99)
    assert not all(torch.equal(a, b) for a, b in zip(full_state(other).values(), saved.values()))
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    resumed = manager(tmp_path).resume(other.ddp, other.optimizer)

    assert resumed.path == path and resumed.step == 2 and resumed.extra == {"k": 1} and resumed.rng_restored
    assert resumed.data == data.state_dict() and resumed.scheduler == run.scheduler.state_dict()
    loaded = full_state(other)
    assert loaded.keys() == saved.keys() and any(k.startswith("optimizer.state.exp_avg") for k in loaded)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    rng_after = capture_rng_state()
    assert torch.equal(rng_after["torch_cpu"], rng_before["torch_cpu"])
    assert rng_after["python"] == rng_before["python"]
    assert np.array_equal(rng_after["numpy"][1], rng_before["numpy"][1])
    assert rng_after["megatron_tracker"].keys() == rng_before["megatron_tracker"].keys()
    assert all(torch.equal(rng_after["megatron_tracker"][k], v) for k, v in rng_before["megatron_tracker"].items())


def test_resume_continues_the_exact_sequence(world_of_one, tmp_path):
    first = build(world_of_one, init_seed=0)
    seed_all(7)
    uninterrupted = run_steps(first, TinyData(seed=1), range(1, 7))

    first, data = build(world_of_one, init_seed=0), TinyData(seed=1)
    seed_all(7)
    before = run_steps(first, data, range(1, 4), manager(tmp_path), save_at={3})
    second, data2 = build(world_of_one, init_seed=42), TinyData(seed=1)
    seed_all(1000)  # whatever a fresh process draws before resuming must not matter
    resumed = manager(tmp_path).resume(second.ddp, second.optimizer)
    second.scheduler.load_state_dict(resumed.scheduler)
    data2.load_state_dict(resumed.data)
    after = run_steps(second, data2, range(resumed.step + 1, 7))

    assert before == {k: uninterrupted[k] for k in (1, 2, 3)}
    assert after == {k: uninterrupted[k] for k in (4, 5, 6)}, "resumed metrics must equal, bit for bit"
    assert len({m["lr"] for m in uninterrupted.values()}) > 3  # the schedule really moves


@pytest.mark.parametrize("phase", ["sharded_written", "files_written", "marked", "renamed"])
def test_a_crash_during_save_leaves_the_previous_checkpoint_latest(world_of_one, tmp_path, phase):
    run, data = build(world_of_one), TinyData()
    run_steps(run, data, range(1, 3), manager(tmp_path), save_at={1})

    def crash(name):
        if name == phase:
            raise Crash(name)

    with pytest.raises(Crash):
        run_steps(run, data, [2], manager(tmp_path, crash), save_at={2})
    ckpt = manager(tmp_path)
    assert (ckpt.save_dir / LATEST).read_text().strip() == step_dir_name(1)
    assert ckpt.find_latest() == ckpt.save_dir / step_dir_name(1)
    assert ckpt.resume(run.ddp, run.optimizer).step == 1
    assert not list(ckpt.save_dir.glob("*.tmp")), "resume cleans leftover temporary directories"

    ckpt.save(2, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())  # the redo
    assert ckpt.find_latest() == ckpt.save_dir / step_dir_name(2)


def test_keep_last_prunes_only_complete_older_checkpoints(world_of_one, tmp_path):
    run, data = build(world_of_one), TinyData()
    ckpt = manager(tmp_path, keep_last=2)
    run_steps(run, data, range(1, 5), ckpt, save_at={1, 2, 3, 4})
    assert sorted(p.name for p in ckpt.save_dir.iterdir()) == [LATEST, step_dir_name(3), step_dir_name(4)]
    # Saving the same step again (an interval save then the final save) is a no-op.
    assert ckpt.save(4, run.ddp, run.optimizer) == ckpt.save_dir / step_dir_name(4)


def test_incomplete_checkpoints_are_named_errors(world_of_one, tmp_path, caplog):
    run, data = build(world_of_one), TinyData()
    ckpt = manager(tmp_path)
    with caplog.at_level(logging.INFO, logger="megatron_vgpo.training.checkpointing"):
        path = run_steps(run, data, [1], ckpt, save_at={1}) and ckpt.save_dir / step_dir_name(1)
    assert any("saved step 1" in r.getMessage() and " s " in r.getMessage() for r in caplog.records)

    (path / "rank_00000.pt").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000001 is incomplete: missing rank_00000.pt"):
        ckpt.resume(run.ddp, run.optimizer)
    (path / "complete.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"complete.json is corrupt"):
        ckpt.find_latest()
    (path / "complete.json").unlink()
    with pytest.raises(CheckpointError, match=r"step_00000001 is incomplete: no complete.json"):
        ckpt.find_latest()
    (ckpt.save_dir / LATEST).write_text("elsewhere\n")
    with pytest.raises(CheckpointError, match="names 'elsewhere'"):
        ckpt.find_latest()


def test_nothing_to_resume(world_of_one, tmp_path):
    run = build(world_of_one)
    assert manager(tmp_path).resume(run.ddp, run.optimizer) is None
    assert manager(tmp_path, resume=False).resume(run.ddp, run.optimizer) is None


def test_marker_names_step_and_world(world_of_one, tmp_path):
    run, data = build(world_of_one), TinyData()
    ckpt = manager(tmp_path)
    run_steps(run, data, [1], ckpt, save_at={1})
    marker = json.loads((ckpt.save_dir / step_dir_name(1) / "complete.json").read_text())
    assert marker["step"] == 1 and marker["world_size"] == 1
    assert ckpt.should_save(50, 150) and ckpt.should_save(150, 150) and not ckpt.should_save(51, 150)
