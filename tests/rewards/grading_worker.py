"""Distributed grading on gloo ranks (``DistributedGrader``), against rank 0 grading alone.

    python -m torch.distributed.run --nproc-per-node 4 tests/rewards/grading_worker.py OUT check
    python -m torch.distributed.run --nproc-per-node N tests/rewards/grading_worker.py OUT measure [RESPONSES]

``check``: batches of 37, 3 (fewer than ranks) and 0 responses graded over the ranks with a custom
reward, and on rank 0 alone; rank 0 writes both, and which rank graded what, to ``OUT/check.json``.
``measure``: a slow custom reward (50 ms per response, one worker per rank) over RESPONSES
responses (default 128); rank 0 prints the wall time (a measurement, not a test).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megatron_vgpo.config.schema import RewardConfig  # noqa: E402
from megatron_vgpo.rewards.distributed import DistributedGrader, rank_scorer  # noqa: E402

CFG = RewardConfig(num_workers=1, auto_workers=False, timeout_s=30.0, format_weight=0.25)


def batch(n: int, seed: int) -> tuple[list[str], list[str], list[dict]]:
    responses = [f"<think>step {seed}.{i}</think> \\boxed{{{(i * 7 + seed) % 5}}}" for i in range(n)]
    return responses, [str(i % 5) for i in range(n)], [{"row_id": f"b{seed}:{i}"} for i in range(n)]


def check(out: Path) -> None:
    rank = dist.get_rank()
    grader = DistributedGrader(rank_scorer(dataclasses.replace(CFG, custom_fn="tests.rewards.grading_fns:score")))
    whose = DistributedGrader(rank_scorer(dataclasses.replace(CFG, custom_fn="tests.rewards.grading_fns:whose")))
    alone = rank_scorer(dataclasses.replace(CFG, custom_fn="tests.rewards.grading_fns:score")) if rank == 0 else None
    report = []
    for seed, n in enumerate([37, 3, 0]):
        responses, truths, infos = batch(n, seed)
        mine = grader.share(n)
        pending = grader.submit(responses[mine], truths[mine], infos[mine])
        spread = pending.result()
        graded_by = [r.extra["rank"] for r in whose.submit(responses[mine], truths[mine], infos[mine]).result()]
        if rank == 0:
            report.append({"n": n, "spread": [dataclasses.asdict(r) for r in spread],
                           "alone": [dataclasses.asdict(r) for r in alone.score(responses, truths, infos)],
                           "graded_by": graded_by})
    if rank == 0:
        (out / "check.json").write_text(json.dumps(report))
        alone.close()
    grader.close()
    whose.close()


def measure(responses: int) -> None:
    grader = DistributedGrader(rank_scorer(dataclasses.replace(CFG, custom_fn="tests.rewards.grading_fns:slow")))
    texts, truths, infos = batch(responses, 0)
    grader.submit(texts[:1], truths[:1]).result()  # the workers have started: start-up is not grading
    dist.barrier()
    start = time.perf_counter()
    mine = grader.share(responses)
    results = grader.submit(texts[mine], truths[mine], infos[mine]).result()
    elapsed = time.perf_counter() - start
    if dist.get_rank() == 0:
        print(f"graded {len(results)} responses (50 ms each) on {dist.get_world_size()} rank(s), "
              f"1 worker each: {elapsed:.2f} s", flush=True)
    grader.close()


if __name__ == "__main__":
    dist.init_process_group("gloo")
    if sys.argv[2] == "check":
        check(Path(sys.argv[1]))
    else:
        measure(int(sys.argv[3]) if len(sys.argv) > 3 else 128)
    dist.destroy_process_group()
