"""Capacity planning: the model shapes (``architectures.py``), the memory model over them
(``memory.py``), the FLOP model of the pipeline stages and its balanced split (``flops.py``) and the
report for a config file (``report.py``)."""

from megatron_vgpo.planning.architectures import (
    QWEN25_VL,
    ArchitectureError,
    ModelShape,
    VisionShape,
    resolve_shape,
    shape_from_hf_config,
    total_params,
)
from megatron_vgpo.planning.flops import (
    StageFlops,
    Workload,
    balanced_split,
    imbalance,
    resolve_split,
    stage_flops,
    workload_from_config,
)
from megatron_vgpo.planning.memory import (
    EnginePlan,
    Gpu,
    MemoryPlan,
    PhaseMemory,
    Reserve,
    RolloutShapes,
    TrainShapes,
    engine_plan,
    plan_from_config,
    plan_memory,
    rollout_memory,
    training_activations,
    training_memory,
)
from megatron_vgpo.planning.report import config_plan, header_gpu, header_world_size, render_plan

__all__ = [
    "QWEN25_VL", "ArchitectureError", "EnginePlan", "Gpu", "MemoryPlan", "ModelShape", "PhaseMemory", "Reserve",
    "RolloutShapes", "StageFlops", "TrainShapes", "VisionShape", "Workload", "balanced_split", "config_plan",
    "engine_plan", "header_gpu", "header_world_size", "imbalance", "plan_from_config", "plan_memory", "render_plan",
    "resolve_shape", "resolve_split", "rollout_memory", "shape_from_hf_config", "stage_flops", "total_params",
    "training_activations", "training_memory", "workload_from_config",
]
