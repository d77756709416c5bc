"""Rollout data parallelism in SPMD: which prompts each rollout group generates, and the gather back.

Colocated with the trainer, every torchrun rank hosts one shard of a vLLM engine
(``distributed_executor_backend="external_launcher"``). vLLM groups consecutive ranks into its
tensor-parallel groups (ranks ``[k * tp, (k + 1) * tp)`` form rollout group ``k``; vLLM calls these
"external data parallel"), independently of the trainer's TP x PP x DP layout. The ranks of one
group must be given the same requests in the same order (each runs its own scheduler, and the runs
stay in lock-step only if they see identical inputs); different groups generate different shares.

``generate_data_parallel`` splits the prompts into contiguous, balanced shares, builds the requests
of this group's share only (a request decodes its prompt's images: other groups' images are never
decoded here), generates them, and all-gathers the results so that every rank holds the whole batch
in request order. Per-request seeds (``SamplingParams.seed``) are offset by the share's first request, so the
tokens do not depend on the number of rollout groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch.distributed as dist

from megatron_vgpo.rollout.engine import RolloutEngine
from megatron_vgpo.rollout.types import RolloutBatch, RolloutRequest, SamplingParams

T = TypeVar("T")


@dataclass(frozen=True)
class RolloutGroups:
    """This rank's place among the rollout engine's groups: ``world = dp_size x tp_size``."""

    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int

    @classmethod
    def from_world(cls, rank: int, world_size: int, tp_size: int) -> "RolloutGroups":
        if tp_size < 1 or world_size % tp_size:
            raise ValueError(f"rollout.tensor_model_parallel_size={tp_size} must divide the world size "
                             f"{world_size}")
        return cls(tp_size=tp_size, tp_rank=rank % tp_size, dp_size=world_size // tp_size,
                   dp_rank=rank // tp_size)

    @classmethod
    def current(cls, tp_size: int) -> "RolloutGroups":
        """From torch.distributed's world (a world of one when it is not initialised)."""
        if not dist.is_initialized():
            return cls.from_world(0, 1, tp_size)
        return cls.from_world(dist.get_rank(), dist.get_world_size(), tp_size)


def share(num_requests: int, dp_rank: int, dp_size: int) -> slice:
    """Contiguous share of rollout group ``dp_rank``: sizes differ by at most one, larger first."""
    base, extra = divmod(num_requests, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    return slice(start, start + base + (dp_rank < extra))


def generate_data_parallel(engine: RolloutEngine, prompts: Sequence[T], sampling: SamplingParams,
                           groups: RolloutGroups, make_request: Callable[[T], RolloutRequest] | None = None
                           ) -> RolloutBatch:
    """Every rank calls this with the same ``prompts``; every rank gets the whole batch back, in
    prompt order. ``make_request`` turns a prompt into its ``RolloutRequest`` (default: the prompts
    are requests already); it is called for this rollout group's share of the prompts only.

    Collective over torch.distributed's default (world) group when ``groups.dp_size > 1``.
    """
    mine = share(len(prompts), groups.dp_rank, groups.dp_size)
    requests = [make_request(p) for p in prompts[mine]] if make_request is not None else list(prompts[mine])
    local = engine.generate(requests, sampling.shifted(mine.start))
    if groups.dp_size == 1:
        return local
    gathered: list = [None] * dist.get_world_size()
    # Only the first rank of each rollout group contributes: its TP peers hold identical copies.
    dist.all_gather_object(gathered, local if groups.tp_rank == 0 else None)
    batches = gathered[::groups.tp_size]
    offsets = [share(len(prompts), k, groups.dp_size).start for k in range(groups.dp_size)]
    return RolloutBatch.concat(batches, offsets)
