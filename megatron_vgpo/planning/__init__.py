"""Capacity planning: the model shapes (``architectures.py``), the memory model over them
(``memory.py``) and its report for a config file (``report.py``)."""

from megatron_vgpo.planning.architectures import (
    QWEN25_VL,
    ArchitectureError,
    ModelShape,
    VisionShape,
    resolve_shape,
    shape_from_hf_config,
    total_params,
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
    "RolloutShapes", "TrainShapes", "VisionShape", "config_plan", "engine_plan", "header_gpu", "header_world_size",
    "plan_from_config", "plan_memory", "render_plan", "resolve_shape", "rollout_memory", "shape_from_hf_config",
    "total_params", "training_activations", "training_memory",
]
