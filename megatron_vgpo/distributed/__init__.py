"""Parallelism: the TP x PP x DP layout (``layout``), process groups (``parallel``, the only module
that talks to ``megatron.core.parallel_state``) and the CPU patches for Megatron (``cpu_compat``)."""

from megatron_vgpo.distributed.cpu_compat import apply_cpu_compat
from megatron_vgpo.distributed.parallel import (
    ParallelGroups,
    destroy_parallel,
    init_parallel,
    layout_string,
)

__all__ = ["ParallelGroups", "apply_cpu_compat", "destroy_parallel", "init_parallel", "layout_string"]
