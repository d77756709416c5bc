"""A real SIGKILL while an asynchronous save's write is in flight: ``latest`` still names the
previous checkpoint, and resuming from it continues the run exactly. Worker: ``async_ckpt_worker.py``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_vgpo.config.schema import CheckpointConfig, ParallelConfig
from megatron_vgpo.distributed import destroy_parallel, init_parallel
from megatron_vgpo.training.checkpointing import LATEST, MARKER, CheckpointManager, step_dir_name
from tests.conftest import REPO
from tests.training.tiny_loop import TinyData, build, seed_all, train_step
from tests.training.worker_wait import wait_for_files

WORKER = Path(__file__).with_name("async_ckpt_worker.py")


@pytest.mark.slow
def test_sigkill_during_async_write_keeps_previous_latest_and_resume_is_exact(tmp_path):
    save_dir, steps_json = tmp_path / "ckpt", tmp_path / "steps.json"
    assert not dist.is_initialized()
    log = tmp_path / "worker.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    # Its own session: the kill reaches the async writer processes too, as a job kill does.
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(save_dir), str(steps_json)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    # "trained": step 3 ran while the write of step 2 was paused, i.e. training did not wait for it.
    wait_for_files([tmp_path / "paused", tmp_path / "trained"], proc, log, timeout=300,
                   what="pausing in its write and training on")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    tmp = save_dir / (step_dir_name(2) + ".tmp")
    assert (save_dir / LATEST).read_text().strip() == step_dir_name(1)
    assert sorted(p.name for p in save_dir.iterdir()) == [LATEST, step_dir_name(1), tmp.name]
    assert list(tmp.glob("*.distcp")) and not (tmp / MARKER).exists() and not (tmp / ".metadata").exists()
    killed_run = {int(k): v for k, v in json.loads(steps_json.read_text()).items()}

    groups = init_parallel(ParallelConfig())
    try:
        ckpt = CheckpointManager(CheckpointConfig(save_dir=str(save_dir), async_save=True), 0, 1)
        run, data = build(groups, init_seed=5), TinyData(seed=1)
        resumed = ckpt.resume(run.ddp, run.optimizer)
        assert resumed.step == 1 and not tmp.exists()
        run.scheduler.load_state_dict(resumed.scheduler)
        data.load_state_dict(resumed.data)
        after = {step: train_step(run, data) for step in (2, 3, 4)}

        fresh = build(groups, init_seed=0)
        seed_all(7)
        fresh_data = TinyData(seed=1)
        uninterrupted = {step: train_step(fresh, fresh_data) for step in (1, 2, 3, 4)}
    finally:
        destroy_parallel()
    assert killed_run == {k: uninterrupted[k] for k in (1, 2, 3)}, "the async save perturbed the killed run"
    assert after == {k: uninterrupted[k] for k in (2, 3, 4)}, "steps after the resume must equal, bit for bit"
