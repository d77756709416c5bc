"""The TP x PP x DP layout of a world size: pure arithmetic, no process groups.

Used by config validation and ``--dry-run`` (which may describe a 32-GPU layout on a laptop) and by
``parallel.py`` when it creates the process groups.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int
    pp: int
    dp: int
    vpp: int | None = None

    def describe(self) -> str:
        vpp = f" (virtual pipeline {self.vpp} chunks per rank)" if self.vpp else ""
        return f"world size {self.world_size} = TP {self.tp} x PP {self.pp} x DP {self.dp}{vpp}"


def parallel_layout(parallel, world_size: int) -> ParallelLayout:
    """Layout of ``world_size`` ranks under a ``ParallelConfig``; ValueError names the fields when
    the world size is not a multiple of TP x PP."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world_size < 1 or world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size x "
            f"parallel.pipeline_model_parallel_size = {tp} x {pp} = {tp * pp}")
    return ParallelLayout(world_size, tp, pp, world_size // (tp * pp), parallel.virtual_pipeline_model_parallel_size)
