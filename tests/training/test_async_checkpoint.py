"""Asynchronous saves (``checkpoint.async_save``) in one process on CPU/gloo: training goes on while
the shards of a periodic save are written, ``latest`` moves only once the write is committed, a
second save waits for the first, the run's last save (and any save ``should_save`` did not schedule)
is complete when ``save`` returns, and an async-saved checkpoint resumes bit-exactly.

The SIGKILL of a run whose async write is in flight is in ``test_async_checkpoint_processes.py``.
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_vgpo.config.schema import CheckpointConfig
from megatron_vgpo.training.checkpointing import (LATEST, CheckpointError, CheckpointManager, resolve_async_save,
                                                  step_dir_name, verify_checkpoint)
from tests.training.tiny_loop import TinyData, build, global_tensors, seed_all, train_step

TOTAL = 6


def manager(save_dir, **kw) -> CheckpointManager:
    return CheckpointManager(CheckpointConfig(save_dir=str(save_dir), **kw), rank=0, world_size=1)


def full_state(run) -> dict:
    sharded = run.model.sharded_state_dict()
    return global_tensors({"model": sharded, "optimizer": run.optimizer.sharded_state_dict(sharded)})


def latest(save_dir):
    path = save_dir / LATEST
    return path.read_text().strip() if path.exists() else None


def test_async_default_resolves_to_the_device():
    assert resolve_async_save("auto") == torch.cuda.is_available()
    assert resolve_async_save(True) and not resolve_async_save(False)
    assert CheckpointConfig().async_save == "auto"


def test_async_save_commits_later_and_resumes_exactly(world_of_one, tmp_path):
    save_dir = tmp_path / "ckpt"
    fresh = build(world_of_one, init_seed=0)
    seed_all(7)
    plain_data = TinyData(seed=1)
    uninterrupted = {step: train_step(fresh, plain_data) for step in range(1, TOTAL + 1)}

    run, data = build(world_of_one, init_seed=0), TinyData(seed=1)
    seed_all(7)
    ckpt = manager(save_dir, async_save=True, save_interval=3)
    assert ckpt.async_save
    metrics = {}
    for step in range(1, TOTAL + 1):
        metrics[step] = train_step(run, data)
        if ckpt.should_save(step, TOTAL):
            ckpt.save(step, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())
            if step == 3:
                # Returned with the write started, not committed: the next steps train meanwhile.
                assert latest(save_dir) is None and (save_dir / (step_dir_name(3) + ".tmp")).is_dir()
    # The save of the last step was waited for, and step 3 committed before it.
    assert latest(save_dir) == step_dir_name(TOTAL)
    assert verify_checkpoint(save_dir / step_dir_name(3))["step"] == 3
    assert not list(save_dir.glob("*.tmp"))
    assert metrics == uninterrupted, "an asynchronous save must not perturb the run"

    # Step 3 was written while steps 4..6 changed the weights: it must hold step 3's state.
    second, data2 = build(world_of_one, init_seed=42), TinyData(seed=1)
    seed_all(1000)
    resumed = manager(save_dir, load_step=3).resume(second.ddp, second.optimizer)
    second.scheduler.load_state_dict(resumed.scheduler)
    data2.load_state_dict(resumed.data)
    assert resumed.step == 3
    assert {s: train_step(second, data2) for s in (4, 5, 6)} == {k: uninterrupted[k] for k in (4, 5, 6)}

    third = build(world_of_one, init_seed=43)
    assert manager(save_dir).resume(third.ddp, third.optimizer).step == TOTAL
    final, loaded = full_state(run), full_state(third)
    assert all(torch.equal(loaded[k], final[k]) for k in final), "the async-saved checkpoint is not bit-exact"


def test_a_second_save_waits_for_the_first(world_of_one, tmp_path):
    save_dir = tmp_path / "ckpt"
    run, data = build(world_of_one), TinyData()
    ckpt = manager(save_dir, async_save=True, save_interval=1)
    for step in (1, 2):
        train_step(run, data)
        assert ckpt.should_save(step, 10)
        ckpt.save(step, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())
        # Before the save of step 2 returned, step 1 was complete and committed.
        assert latest(save_dir) == (step_dir_name(1) if step == 2 else None)
    assert (save_dir / (step_dir_name(2) + ".tmp")).is_dir()
    ckpt.wait()
    assert latest(save_dir) == step_dir_name(2) and not list(save_dir.glob("*.tmp"))
    ckpt.wait()  # nothing in flight: a no-op

    # A manager that loads commits what another one of this process still has in flight.
    train_step(run, data)
    assert ckpt.should_save(3, 10)
    ckpt.save(3, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())
    assert latest(save_dir) == step_dir_name(2)
    other = build(world_of_one, init_seed=5)
    assert manager(save_dir).load(save_dir / step_dir_name(3), other.ddp, other.optimizer).step == 3

    # A save should_save did not schedule (a stop request's, a tool's) is complete when it returns.
    train_step(run, data)
    ckpt.save(4, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())
    assert latest(save_dir) == step_dir_name(4)


@pytest.mark.parametrize("phase", ["write_started", "files_written", "sharded_written", "marked"])
def test_a_crash_in_an_async_save_leaves_the_previous_checkpoint_latest(world_of_one, tmp_path, phase):
    class Crash(BaseException):
        pass

    def crash(name):
        if name == phase:
            raise Crash(name)

    save_dir = tmp_path / "ckpt"
    run, data = build(world_of_one), TinyData()
    train_step(run, data)
    manager(save_dir).save(1, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())
    train_step(run, data)
    crashing = CheckpointManager(CheckpointConfig(save_dir=str(save_dir), async_save=True, save_interval=1), 0, 1,
                                 phase_hook=crash)
    with pytest.raises(Crash):
        assert crashing.should_save(2, 10)
        crashing.save(2, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())
        assert (save_dir / (step_dir_name(2) + ".tmp")).is_dir()
        crashing.wait()
    assert latest(save_dir) == step_dir_name(1)
    _drop_in_flight()
    assert manager(save_dir).resume(run.ddp, run.optimizer).step == 1


def test_a_failed_background_write_is_a_named_error_and_latest_stays(world_of_one, tmp_path, monkeypatch):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    save_dir = tmp_path / "ckpt"
    run, data = build(world_of_one), TinyData()
    ckpt = manager(save_dir, async_save=True, save_interval=1)
    train_step(run, data)
    ckpt.save(1, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())

    @functools.wraps(filesystem_async._write_item)  # megatron-core inspects its signature
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(filesystem_async, "_write_item", disk_full)  # the forked writers inherit it
    train_step(run, data)
    assert ckpt.should_save(2, 10)
    ckpt.save(2, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())
    # megatron-core 0.16 passes the message on, 0.17 only the exception type
    with pytest.raises(CheckpointError, match=r"asynchronous checkpoint write failed \(.*(No space left|OSError)"):
        ckpt.wait()
    assert latest(save_dir) == step_dir_name(1)


def _drop_in_flight() -> None:
    """What the death of the crashed process would do: forget its write in flight, and the result
    that write left in megatron-core's process-wide results queue (the next finalization reads it)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_vgpo.training import checkpointing

    queue = checkpointing._ASYNC_QUEUE
    while queue is not None and queue.async_calls:
        _, caller, _ = queue.async_calls.popleft()
        caller.close()
        results = getattr(filesystem_async, "get_write_results_queue", None)  # megatron-core 0.17
        (results or filesystem_async._get_write_results_queue)().get(timeout=60)
