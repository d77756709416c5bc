"""Process groups of a run: the only module of the package that talks to ``megatron.core.parallel_state``.

``init_parallel(ParallelConfig)`` starts torch.distributed (gloo on CPU, nccl on GPU), creates
Megatron's tensor / pipeline / data-parallel groups and seeds its RNG tracker, and returns a
``ParallelGroups``: an explicit, frozen record of the groups and of this rank's coordinates that the
rest of the package passes around (model builders, loss reductions, weight sync) instead of reading
global state. Megatron's own internals (schedules, layers) still read ``parallel_state``; that is
theirs, not ours.

Rank order is Megatron's default ``tp-cp-ep-dp-pp``: TP ranks are adjacent, PP is the slowest axis.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_vgpo.distributed.cpu_compat import apply_cpu_compat
from megatron_vgpo.distributed.layout import parallel_layout


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the TP x PP x DP grid and the groups to communicate in."""

    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    pp_size: int
    pp_rank: int
    dp_size: int
    dp_rank: int
    vpp_size: Optional[int]  # model chunks per pipeline rank (interleaved schedule), None: off
    sequence_parallel: bool
    tp_group: Any  # torch.distributed.ProcessGroup
    pp_group: Any
    dp_group: Any
    mp_group: Any  # TP x PP of one model replica
    pp_ranks: tuple[int, ...]  # global ranks of this rank's pipeline, first stage first
    pg_collection: Any  # megatron.core ProcessGroupCollection, handed to Megatron modules
    device: torch.device

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def chunk_stages(self, vp_stage: Optional[int] = None) -> tuple[bool, bool]:
        """``(pre_process, post_process)`` of the model chunk ``vp_stage`` on this rank: whether it
        holds the embedding (and vision tower) and whether it holds the output layer."""
        if vp_stage is None or not self.vpp_size:
            return self.is_first_stage, self.is_last_stage
        return (self.is_first_stage and vp_stage == 0,
                self.is_last_stage and vp_stage == self.vpp_size - 1)

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size} "
                f"pp {self.pp_rank}/{self.pp_size} dp {self.dp_rank}/{self.dp_size}")


def resolve_backend(backend: str) -> str:
    """'auto' -> nccl when CUDA is available, gloo otherwise."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("parallel.backend='nccl' needs CUDA; use 'gloo' or 'auto' on a CPU machine")
    return backend


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_process_group(backend: str, timeout_minutes: int, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return
    timeout = timedelta(minutes=timeout_minutes)
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group(backend=backend, timeout=timeout)
    else:  # a single-process test or tool: a world of one, without touching os.environ
        dist.init_process_group(backend=backend, timeout=timeout, rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{free_port()}")


def init_parallel(parallel, seed: int = 1234, device: str = "auto") -> ParallelGroups:
    """Start torch.distributed and Megatron model parallelism from a ``ParallelConfig``.

    Reads the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK); without
    it, starts a world of one. ``seed`` seeds Megatron's RNG tracker (TP ranks get distinct streams
    for their weight shards, DP ranks the same). ``device`` is ``trainer.device`` (see
    ``utils/device.py``); it becomes ``ParallelGroups.device`` and this process's current CUDA device.
    Raises ValueError naming the fields when the world size does not fit TP x PP.
    """
    apply_cpu_compat()
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_vgpo.utils.device import resolve_device

    torch_device = resolve_device(device)
    backend = resolve_backend(parallel.backend)
    _init_process_group(backend, parallel.timeout_minutes, torch_device)
    layout = parallel_layout(parallel, dist.get_world_size())
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        distributed_timeout_minutes=parallel.timeout_minutes,
    )
    model_parallel_cuda_manual_seed(seed)
    pp_group = ps.get_pipeline_model_parallel_group()
    return ParallelGroups(
        world_size=layout.world_size, rank=dist.get_rank(),
        tp_size=layout.tp, tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_size=layout.pp, pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_size=layout.dp, dp_rank=ps.get_data_parallel_rank(),
        vpp_size=layout.vpp, sequence_parallel=bool(parallel.sequence_parallel),
        tp_group=ps.get_tensor_model_parallel_group(), pp_group=pp_group,
        dp_group=ps.get_data_parallel_group(), mp_group=ps.get_model_parallel_group(),
        pp_ranks=tuple(dist.get_process_group_ranks(pp_group)),
        pg_collection=ProcessGroupCollection.use_mpu_process_groups(),
        device=torch_device,
    )


def destroy_parallel() -> None:
    """Tear down Megatron's groups and torch.distributed (tests, tools); safe to call twice."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def layout_string(parallel, world_size: int) -> str:
    """``"world size 8 = TP 2 x PP 2 x DP 2"`` for a ``ParallelConfig`` (no process groups needed)."""
    return parallel_layout(parallel, world_size).describe()
