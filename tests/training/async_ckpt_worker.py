"""Worker of ``test_async_checkpoint_processes.py``.

    python async_ckpt_worker.py SAVE_DIR STEPS_JSON

A world of one trains the tiny loop with asynchronous saves after steps 1 and 2. The background
writer of step 2 writes the first item of its shard file, then creates SAVE_DIR/../paused and sleeps
(the kill lands while the write is in flight); meanwhile the trainer goes on with step 3, writes the
metrics of steps 1..3 to STEPS_JSON, and waits for the save until killed.

Imports are inside the functions: Megatron's checkpoint writer spawns a helper process that
re-imports this file's top level, which should stay cheap.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path


def pause_writes_when(flag: dict, paused: Path) -> None:
    """Make megatron-core's shard writer (it runs in the processes the async save forks, which
    inherit ``flag`` as it was at the fork) stop for good after its first item once ``flag["on"]``."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    write_item = filesystem_async._write_item

    @functools.wraps(write_item)  # megatron-core inspects its signature
    def write_then_pause(*args, **kwargs):
        result = write_item(*args, **kwargs)
        if flag["on"]:
            paused.write_text("write in flight")
            time.sleep(600)  # the test SIGKILLs us here
        return result

    filesystem_async._write_item = write_then_pause


def main(save_dir: Path, steps_json: Path) -> None:
    from megatron_vgpo.config.schema import CheckpointConfig, ParallelConfig
    from megatron_vgpo.distributed import init_parallel
    from megatron_vgpo.training.checkpointing import CheckpointManager
    from tests.training.tiny_loop import TinyData, build, seed_all, train_step

    groups = init_parallel(ParallelConfig())
    ckpt = CheckpointManager(CheckpointConfig(save_dir=str(save_dir), async_save=True, save_interval=1), 0, 1)
    flag = {"on": False}
    pause_writes_when(flag, save_dir.parent / "paused")
    run, data = build(groups, init_seed=0), TinyData(seed=1)
    seed_all(7)
    metrics = {}
    for step in (1, 2, 3):
        metrics[step] = train_step(run, data)
        steps_json.write_text(json.dumps(metrics))
        due = ckpt.should_save(step, 10)  # also the per-step poll: must not wait for the paused writer
        if due and step in (1, 2):
            flag["on"] = step == 2
            ckpt.save(step, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())
    (save_dir.parent / "trained").write_text("3")
    ckpt.wait()  # blocks on the paused writer until the kill


if __name__ == "__main__":  # dist_checkpointing spawns a process: the guard is required
    main(Path(sys.argv[1]), Path(sys.argv[2]))
