"""Grading spread over the ranks: each rank grades a contiguous share of a batch's responses in its
own worker pool, in the background, and the results are all-gathered, in order, onto every rank.

Graded on rank 0 alone, a batch kept every other rank waiting (and a timed-out call held up the
whole world). Here every rank holds a ``RewardScorer`` (``rank_scorer``: its pool sized to the node
by default), grades ``share(n, rank, world)`` of the batch, and the all-gather returns exactly the
list a single scorer would have returned: grading is a function of each response alone.

``submit`` starts the rank's share in a background thread (the thread only waits on the pool's
worker processes) and returns at once, so the caller can keep the devices busy, e.g. generate the
next batch; ``PendingGrades.result()`` is the collective that joins them. Every rank must submit and
collect the same batches in the same order.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Mapping, Optional, Sequence

import torch.distributed as dist

from megatron_vgpo.rewards.pool import RewardWorkerError
from megatron_vgpo.rewards.scorer import RewardResult, RewardScorer
from megatron_vgpo.rollout.data_parallel import share


def node_num_workers() -> int:
    """Grading workers per rank sized to the node: ``max(1, CPUs // ranks on the node // 2)``, half
    the CPUs this process may run on shared by the node's ranks (torchrun's ``LOCAL_WORLD_SIZE``),
    the other half left to the trainer and engine processes."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cpus // local_ranks // 2)


def rank_scorer(cfg) -> RewardScorer:
    """This rank's scorer for ``cfg`` (a ``RewardConfig``): ``node_num_workers()`` workers when
    ``cfg.auto_workers``, else ``cfg.num_workers``."""
    return RewardScorer(dataclasses.replace(cfg, num_workers=node_num_workers()) if cfg.auto_workers else cfg)


class PendingGrades:
    """A batch whose share is being graded on this rank; ``result()`` gathers every rank's share."""

    def __init__(self, future: Future, group, world_size: int):
        self._future, self._group, self._world_size = future, group, world_size

    def result(self) -> list[RewardResult]:
        """Every response's ``RewardResult``, in batch order, on every rank (collective). A grading
        failure on any rank (its workers cannot start) is raised on every rank."""
        try:
            local, error = (True, self._future.result()), None
        except Exception as e:
            local, error = (False, f"{type(e).__name__}: {e}"), e
        if self._world_size == 1:
            if error is not None:
                raise error
            return local[1]
        gathered: list = [None] * self._world_size
        dist.all_gather_object(gathered, local, group=self._group)
        if error is not None:
            raise error
        failed = [(rank, value) for rank, (ok, value) in enumerate(gathered) if not ok]
        if failed:
            raise RewardWorkerError(f"grading failed on rank {failed[0][0]}: {failed[0][1]}")
        return [result for _, results in gathered for result in results]


class DistributedGrader:
    """A ``RewardScorer`` per rank, one share of each batch each (``group``: None is the world)."""

    def __init__(self, scorer: RewardScorer, group=None):
        self.scorer, self.group = scorer, group
        distributed = dist.is_initialized()
        self.rank = dist.get_rank(group) if distributed else 0
        self.world_size = dist.get_world_size(group) if distributed else 1
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vgpo-grading")

    def share(self, num_responses: int) -> slice:
        """The contiguous share of a batch of ``num_responses`` that this rank grades."""
        return share(num_responses, self.rank, self.world_size)

    def submit(self, responses: Sequence[str], ground_truths: Sequence[str],
               infos: Optional[Sequence[Mapping]] = None) -> PendingGrades:
        """Start grading this rank's share (the arguments hold the share only: ``share(n)`` of the
        batch) in the background; returns at once."""
        future = self._thread.submit(self.scorer.score, list(responses), list(ground_truths),
                                     None if infos is None else list(infos))
        return PendingGrades(future, self.group, self.world_size)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self.scorer.close()
