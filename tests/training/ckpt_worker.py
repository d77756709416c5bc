"""Workers of ``test_checkpoint_processes.py``.

    python ckpt_worker.py kill SAVE_DIR STEPS_JSON
        a world of one trains the tiny loop, saves after step 1, writes its metrics to STEPS_JSON,
        then, during the save after step 2, writes SAVE_DIR/../paused and sleeps until killed.
    torchrun --nproc-per-node 2 ckpt_worker.py layouts SAVE_DIR
        saves under TP1 x DP2 after one step, then loads that checkpoint under TP2 and under PP2 and
        checks that every model and optimizer shard of every rank equals the saved global tensors.

Imports are inside the functions: Megatron's checkpoint writer spawns a helper process that
re-imports this file's top level, which should stay cheap.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def kill_mode(save_dir: Path, steps_json: Path) -> None:
    from megatron_vgpo.config.schema import CheckpointConfig, ParallelConfig
    from megatron_vgpo.distributed import init_parallel
    from megatron_vgpo.training.checkpointing import CheckpointManager
    from tests.training.tiny_loop import TinyData, build, seed_all, train_step

    groups = init_parallel(ParallelConfig())
    paused = save_dir.parent / "paused"

    def pause_in_save(phase: str) -> None:
        if phase == "sharded_written" and ckpt_step == 2:
            paused.write_text(phase)
            time.sleep(600)  # the test SIGKILLs us here

    ckpt = CheckpointManager(CheckpointConfig(save_dir=str(save_dir)), 0, 1, phase_hook=pause_in_save)
    run, data = build(groups, init_seed=0), TinyData(seed=1)
    seed_all(7)
    metrics = {}
    for ckpt_step in (1, 2):
        metrics[ckpt_step] = train_step(run, data)
        steps_json.write_text(json.dumps(metrics))
        ckpt.save(ckpt_step, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())


def reference_state(run) -> dict:
    """The model's and optimizer's sharded state dicts (ShardedTensors that view the live tensors)."""
    sharded = run.model.sharded_state_dict()
    return {"model": sharded, "optimizer": run.optimizer.sharded_state_dict(sharded)}


def layouts_mode(save_dir: Path) -> None:
    import torch.distributed as dist

    from megatron_vgpo.config.schema import CheckpointConfig, ParallelConfig
    from megatron_vgpo.distributed import destroy_parallel, init_parallel
    from megatron_vgpo.training.checkpointing import CheckpointManager
    from tests.training.tiny_loop import TinyData, build, global_tensors, seed_all, shard_mismatches, train_step

    groups = init_parallel(ParallelConfig())  # TP1 x PP1 x DP2
    run = build(groups, init_seed=0)
    seed_all(3)
    train_step(run, TinyData())
    reference = global_tensors(reference_state(run))  # complete on every rank at TP = PP = 1
    ckpt = CheckpointManager(CheckpointConfig(save_dir=str(save_dir)), dist.get_rank(), dist.get_world_size(),
                             dp_group=groups.dp_group)  # the two replicas share the writing
    ckpt.save(1, run.ddp, run.optimizer, run.scheduler.state_dict(), {"index": 1})

    for layout in (dict(tensor_model_parallel_size=2), dict(pipeline_model_parallel_size=2)):
        groups = init_parallel(ParallelConfig(**layout))
        run = build(groups, init_seed=11)
        resumed = ckpt.resume(run.ddp, run.optimizer)
        assert resumed.step == 1 and resumed.rng_restored, resumed
        state = reference_state(run)
        bad = shard_mismatches(state, reference)
        if bad:
            raise AssertionError(f"{groups.describe()}: shards differ from the saved tensors: {bad}")
        keys = len(global_tensors(state))
        print(f"{layout}: rank {groups.rank} ({groups.describe()}) {keys} tensors equal", flush=True)
    destroy_parallel()


if __name__ == "__main__":  # dist_checkpointing spawns a process: the guard is required
    if sys.argv[1] == "kill":
        kill_mode(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        layouts_mode(Path(sys.argv[2]))
