"""Worker of ``test_checkpoint_agreement.py``: two ranks (TP1 x DP2, gloo) must agree on the checkpoint
they resume from.

    torchrun --nproc-per-node 2 multirank_ckpt_worker.py SAVE_DIR

Saves steps 1 and 2 asynchronously (the replicas share the writing), then resumes twice into fresh
models: once with the load of step 2 failing on rank 1 only (after the collective part succeeded),
once with a shard of step 2 truncated. Each time both ranks must fall back to step 1 and hold
exactly its tensors; each rank prints one line per resume.

Imports are inside the functions: Megatron's checkpoint writer spawns a helper process that
re-imports this file's top level, which should stay cheap.
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(save_dir: Path) -> None:
    import torch.distributed as dist

    from megatron_vgpo.config.schema import CheckpointConfig, ParallelConfig
    from megatron_vgpo.distributed import destroy_parallel, init_parallel
    from megatron_vgpo.training.checkpointing import CheckpointManager, step_dir_name
    from tests.training.ckpt_worker import reference_state
    from tests.training.tiny_loop import TinyData, build, global_tensors, seed_all, shard_mismatches, train_step

    groups = init_parallel(ParallelConfig())
    rank = dist.get_rank()
    ckpt = CheckpointManager(CheckpointConfig(save_dir=str(save_dir), async_save=True, save_interval=1), rank,
                             dist.get_world_size(), dp_group=groups.dp_group)
    run, data = build(groups, init_seed=0), TinyData(seed=1)
    seed_all(3)
    for step in (1, 2):
        train_step(run, data)
        if step == 1:
            step1 = global_tensors(reference_state(run))
        assert ckpt.should_save(step, 10)
        ckpt.save(step, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())
    ckpt.wait()

    def resume(label: str) -> None:
        fresh = build(groups, init_seed=11)
        resumed = CheckpointManager(CheckpointConfig(save_dir=str(save_dir)), rank, dist.get_world_size(),
                                    dp_group=groups.dp_group).resume(fresh.ddp, fresh.optimizer)
        bad = shard_mismatches(reference_state(fresh), step1)
        assert resumed.step == 1 and not bad, (label, resumed.step, bad)
        print(f"{label}: rank {rank} resumed step {resumed.step}, tensors equal", flush=True)

    original = CheckpointManager._load_checked

    def fails_on_rank_1(self, path, marker, model, optimizer):
        state = original(self, path, marker, model, optimizer)
        if rank == 1 and path.name == step_dir_name(2):
            raise RuntimeError("rank 1 cannot read its part")
        return state

    CheckpointManager._load_checked = fails_on_rank_1
    resume("one rank fails")
    CheckpointManager._load_checked = original

    if rank == 0:
        with open(sorted((save_dir / step_dir_name(2)).glob("*.distcp"))[0], "r+b") as f:
            f.truncate(1000)
    dist.barrier()
    resume("truncated shard")
    destroy_parallel()


if __name__ == "__main__":  # dist_checkpointing spawns a process: the guard is required
    main(Path(sys.argv[1]))
