"""RL algorithms as small pure tensor functions: outcome advantages, the DAPO loss and its filters.

``advantages``: group-relative outcome advantages (GRPO / Dr.GRPO), grouped by prompt id.
``dapo``: the clipped token-level policy loss, dynamic sampling and the overlong penalty.
``vgpo``: VGPO's visual focus scores and token/trajectory advantage shaping.
"""

from megatron_vgpo.algorithms.advantages import (
    broadcast_to_tokens,
    compute_grpo_outcome_advantages,
    group_ids_to_index,
    group_mean_std,
)
from megatron_vgpo.algorithms.dapo import (
    PolicyLossOutput,
    dapo_policy_loss,
    dynamic_sampling_keep,
    finalize_policy_metrics,
    kept_group_ids,
    low_var_kl,
    overlong_penalty,
    sum_metric_sums,
)
from megatron_vgpo.algorithms.vgpo import (
    VGPOConfig,
    VGPOOutput,
    shape_advantages,
    vgpo_shape_advantages,
    visual_focus_scores,
)

__all__ = [
    "VGPOConfig",
    "VGPOOutput",
    "shape_advantages",
    "vgpo_shape_advantages",
    "visual_focus_scores",
    "PolicyLossOutput",
    "broadcast_to_tokens",
    "compute_grpo_outcome_advantages",
    "dapo_policy_loss",
    "dynamic_sampling_keep",
    "finalize_policy_metrics",
    "group_ids_to_index",
    "group_mean_std",
    "kept_group_ids",
    "low_var_kl",
    "overlong_penalty",
    "sum_metric_sums",
]
