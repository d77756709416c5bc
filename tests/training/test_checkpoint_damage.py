"""A damaged checkpoint (issue 17): the manifest in ``complete.json`` catches it, ``resume`` names the
file and the reason in one warning line and falls back to the previous checkpoint, and the resumed
run equals, bit for bit, one that was never interrupted. Also: a checkpoint that passes the check
but fails to load, a load that fails half-way (the fallback must leave the model as a clean load
would), every checkpoint damaged, ``checkpoint.load_step``, and a garbled ``latest``.

A world of one on CPU; the saved directory (steps 1 and 2, ``latest`` naming step 2) is written once
per module and copied for each test.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch

from megatron_vgpo.config.schema import CheckpointConfig, ParallelConfig
from megatron_vgpo.training import checkpointing
from megatron_vgpo.training.checkpointing import (LATEST, MARKER, CheckpointError, CheckpointManager,
                                                  capture_rng_state, step_dir_name, verify_checkpoint)
from tests.training.tiny_loop import TinyData, build, global_tensors, seed_all, train_step

LOGGER = "megatron_vgpo.training.checkpointing"
TOTAL = 4


def full_state(run) -> dict:
    sharded = run.model.sharded_state_dict()
    return global_tensors({"model": sharded, "optimizer": run.optimizer.sharded_state_dict(sharded)})


def save_steps(groups, save_dir: Path, steps=(1, 2)) -> None:
    """The tiny run (init seed 0, data seed 1, seed 7), saving after each of ``steps``."""
    run, data = build(groups, init_seed=0), TinyData(seed=1)
    seed_all(7)
    ckpt = CheckpointManager(CheckpointConfig(save_dir=str(save_dir)), 0, 1)
    for step in range(1, max(steps) + 1):
        train_step(run, data)
        if step in steps:
            ckpt.save(step, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    from megatron_vgpo.distributed import destroy_parallel, init_parallel

    save_dir = tmp_path_factory.mktemp("pristine") / "ckpt"
    groups = init_parallel(ParallelConfig())
    try:
        save_steps(groups, save_dir)
    finally:
        destroy_parallel()
    return save_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """Metrics of steps 1..TOTAL of the same run, never saved nor interrupted."""
    from megatron_vgpo.distributed import destroy_parallel, init_parallel

    groups = init_parallel(ParallelConfig())
    try:
        run, data = build(groups, init_seed=0), TinyData(seed=1)
        seed_all(7)
        return {step: train_step(run, data) for step in range(1, TOTAL + 1)}
    finally:
        destroy_parallel()


@pytest.fixture
def save_dir(pristine, tmp_path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "ckpt"))


def resume_and_finish(groups, save_dir: Path, **cfg) -> tuple:
    """A fresh process's resume (other init, other seed), then the steps up to TOTAL."""
    run, data = build(groups, init_seed=42), TinyData(seed=1)
    seed_all(1000)
    resumed = CheckpointManager(CheckpointConfig(save_dir=str(save_dir), **cfg), 0, 1).resume(run.ddp, run.optimizer)
    run.scheduler.load_state_dict(resumed.scheduler)
    data.load_state_dict(resumed.data)
    return resumed, run, data, {step: train_step(run, data) for step in range(resumed.step + 1, TOTAL + 1)}


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def _first_shard(path: Path) -> Path:
    return sorted(path.glob("*.distcp"))[0]


def truncate_shard(path: Path) -> None:
    with open(_first_shard(path), "r+b") as f:
        f.truncate(1000)


def delete_shard(path: Path) -> None:
    _first_shard(path).unlink()


def flip_bytes(name: str):
    def damage(path: Path) -> None:
        data = bytearray((path / name).read_bytes())
        middle = len(data) // 2
        data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
        (path / name).write_bytes(bytes(data))
    return damage


def delete_marker(path: Path) -> None:
    (path / MARKER).unlink()


DAMAGE = {
    "truncated_shard": (truncate_shard, r"step_00000002 is damaged: __0_0\.distcp has 1000 bytes, complete\.json "
                                        r"records \d+ \(cut short\?\)"),
    "missing_shard": (delete_shard, r"step_00000002 is incomplete: missing __0_0\.distcp"),
    "corrupt_dcp_metadata": (flip_bytes(".metadata"),
                             r"step_00000002 is damaged: \.metadata does not match its SHA-256 in complete\.json"),
    "corrupt_metadata_json": (flip_bytes("metadata.json"),
                              r"step_00000002 is damaged: metadata\.json does not match its SHA-256"),
    "deleted_marker": (delete_marker, r"step_00000002 is incomplete: no complete\.json"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_latest_is_named_and_resume_falls_back_exactly(world_of_one, save_dir, uninterrupted, kind, caplog):
    damage, reason = DAMAGE[kind]
    damage(save_dir / step_dir_name(2))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        resumed, run, data, after = resume_and_finish(world_of_one, save_dir)

    assert resumed.step == 1 and resumed.path == save_dir / step_dir_name(1)
    [warning] = warnings_of(caplog)  # one line
    assert re.search(reason, warning), warning
    assert warning.endswith("falling back to the previous checkpoint step_00000001"), warning
    assert after == {k: uninterrupted[k] for k in (2, 3, 4)}, "the resumed run must equal the uninterrupted one"

    # The next save of step 2 replaces the damaged directory.
    ckpt = CheckpointManager(CheckpointConfig(save_dir=str(save_dir)), 0, 1)
    ckpt.save(2, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())
    assert (save_dir / LATEST).read_text().strip() == step_dir_name(2)
    assert verify_checkpoint(save_dir / step_dir_name(2))["step"] == 2


def test_check_failure_that_passes_the_manifest_but_not_the_load_falls_back(world_of_one, tmp_path, uninterrupted,
                                                                            monkeypatch, caplog):
    """Shards above the hash threshold carry only their size: garbage of the right length passes
    the check, so the load itself must fail cleanly, be named, and fall back."""
    monkeypatch.setattr(checkpointing, "HASH_MAX_BYTES", 0)  # like the GB-sized shards of a real model
    save_dir = tmp_path / "ckpt"
    save_steps(world_of_one, save_dir)
    for shard in (save_dir / step_dir_name(2)).glob("*.distcp"):
        shard.write_bytes(bytes(shard.stat().st_size))
    verify_checkpoint(save_dir / step_dir_name(2))  # passes: sizes only
    with caplog.at_level(logging.INFO, logger=LOGGER):
        resumed, _, _, after = resume_and_finish(world_of_one, save_dir)
    assert resumed.step == 1
    [warning] = warnings_of(caplog)
    assert re.search(r"step_00000002 passed its check but failed to load \(\w+", warning), warning
    assert after == {k: uninterrupted[k] for k in (2, 3, 4)}


def test_fallback_after_a_partial_load_equals_a_clean_load(world_of_one, save_dir, uninterrupted, monkeypatch):
    """The worst case: the load of step 2 fills the model and the optimizer in place, then raises
    (torch's CheckpointException, a BaseException). The fallback's model, optimizer and RNG must be
    exactly those of a clean load of step 1."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    clean = build(world_of_one, init_seed=42)
    CheckpointManager(CheckpointConfig(save_dir=str(save_dir)), 0, 1).load(save_dir / step_dir_name(1), clean.ddp,
                                                                           clean.optimizer)
    clean_state, clean_rng = full_state(clean), capture_rng_state()

    real_load = dist_checkpointing.load
    touched = []

    def load_then_fail(state, path, *args, **kwargs):
        loaded = real_load(state, path, *args, **kwargs)
        if path.endswith(step_dir_name(2)):
            touched.append(path)
            raise CheckpointException("injected", {0: (EOFError("injected after a full in-place load"), None)})
        return loaded

    monkeypatch.setattr(dist_checkpointing, "load", load_then_fail)
    run = build(world_of_one, init_seed=42)
    seed_all(1000)
    resumed = CheckpointManager(CheckpointConfig(save_dir=str(save_dir)), 0, 1).resume(run.ddp, run.optimizer)
    assert touched and resumed.step == 1
    state = full_state(run)
    assert state.keys() == clean_state.keys()
    assert all(torch.equal(state[k], clean_state[k]) for k in clean_state), "the fallback is not a clean load"
    rng = capture_rng_state()
    assert torch.equal(rng["torch_cpu"], clean_rng["torch_cpu"]) and rng["python"] == clean_rng["python"]

    data = TinyData(seed=1)
    run.scheduler.load_state_dict(resumed.scheduler)
    data.load_state_dict(resumed.data)
    assert {s: train_step(run, data) for s in (2, 3, 4)} == {k: uninterrupted[k] for k in (2, 3, 4)}


def test_every_checkpoint_damaged_is_a_clear_error_naming_each(world_of_one, save_dir, caplog):
    truncate_shard(save_dir / step_dir_name(2))
    delete_marker(save_dir / step_dir_name(1))
    run = build(world_of_one)
    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(CheckpointError) as err:
        CheckpointManager(CheckpointConfig(save_dir=str(save_dir)), 0, 1).resume(run.ddp, run.optimizer)
    message = str(err.value)
    assert message.startswith(f"no usable checkpoint in {save_dir}: ")
    assert "step_00000002 is damaged: __0_0.distcp has 1000 bytes" in message
    assert "step_00000001 is incomplete: no complete.json" in message
    assert "checkpoint.resume=false" in message
    assert len(warnings_of(caplog)) == 1  # the fallback from step 2; the error names both


def test_load_step_picks_a_checkpoint_and_never_falls_back(world_of_one, save_dir, uninterrupted):
    resumed, _, _, after = resume_and_finish(world_of_one, save_dir, load_step=1)
    assert resumed.step == 1 and after == {k: uninterrupted[k] for k in (2, 3, 4)}

    truncate_shard(save_dir / step_dir_name(2))
    run = build(world_of_one)
    with pytest.raises(CheckpointError, match=r"checkpoint\.load_step=2: checkpoint \S+step_00000002 is damaged"):
        CheckpointManager(CheckpointConfig(save_dir=str(save_dir), load_step=2), 0, 1).resume(run.ddp, run.optimizer)
    with pytest.raises(CheckpointError, match=r"load_step=7: checkpoint \S+step_00000007 does not exist"):
        CheckpointManager(CheckpointConfig(save_dir=str(save_dir), load_step=7), 0, 1).resume(run.ddp, run.optimizer)


def test_garbled_latest_is_named_and_every_checkpoint_tried(world_of_one, save_dir, caplog):
    (save_dir / LATEST).write_text("\x00\x00garbage")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        resumed, *_ = resume_and_finish(world_of_one, save_dir)
    assert resumed.step == 2
    [warning] = warnings_of(caplog)
    assert f"{save_dir / LATEST} names" in warning and "trying every checkpoint" in warning


def test_checkpoint_without_manifest_is_checked_against_its_metadata(world_of_one, save_dir, uninterrupted,
                                                                     caplog):
    """Format 1 (written before the manifest) still resumes; a shard cut short is still named, from
    the byte ranges DCP's ``.metadata`` records."""
    for step in (1, 2):
        marker_path = save_dir / step_dir_name(step) / MARKER
        marker = json.loads(marker_path.read_text())
        del marker["files"]
        marker_path.write_text(json.dumps({**marker, "format_version": 1}))
    truncate_shard(save_dir / step_dir_name(2))
    with caplog.at_level(logging.INFO, logger=LOGGER):
        resumed, _, _, after = resume_and_finish(world_of_one, save_dir)
    [warning] = warnings_of(caplog)
    assert re.search(r"step_00000002 is damaged: __0_0\.distcp has 1000 bytes, \.metadata places data up to byte",
                     warning), warning
    assert resumed.step == 1 and after == {k: uninterrupted[k] for k in (2, 3, 4)}


def test_manifest_lists_every_file_with_size_and_small_ones_with_a_hash(pristine):
    path = pristine / step_dir_name(2)
    marker = json.loads((path / MARKER).read_text())
    on_disk = {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*")
               if p.is_file() and p.name != MARKER}
    assert {k: v["size"] for k, v in marker["files"].items()} == on_disk
    assert marker["hash"] == "sha256" and marker["hash_max_bytes"] == checkpointing.HASH_MAX_BYTES
    assert all("sha256" in v for v in marker["files"].values())  # a tiny model: every file is small
    assert marker["format_version"] == 2 and marker["step"] == 2 and marker["world_size"] == 1

