"""VGPO as a plug-in: the focus-score statistic and the VGPO advantage shaper.

The math is ``algorithms/vgpo.py`` (VGPO_SPEC.md, eqs. 2-12): ``FocusScores`` runs its eqs. 2-4 on the
last pipeline stage inside each micro-batch of the pass over the original images; the shaper runs
eqs. 5-12 over this data-parallel rank's rows (whole groups). Config: ``algorithm.vgpo``
(``VGPOConfig``). With ``algorithm.hidden_states_from=current`` the scores come from the current
policy inside each update micro-batch, as the released code does; phi needs whole groups, so the
update's micro-batches are then group-aligned (``trainer.micro_batch_size`` a multiple of the group
size, checked by the config validation), and ``official``'s micro-batch min-max is over that
micro-batch, as in the released code.
"""

from __future__ import annotations

import torch

from megatron_vgpo.algorithms.vgpo import (
    VGPOConfig,
    combine_advantages,
    inter_trajectory_factor,
    late_early_ratio,
    trajectory_weights,
    visual_focus_scores,
)
from megatron_vgpo.methods.base import (
    AdvantageShaper,
    ShapingInputs,
    ShapingResult,
    TokenStatistic,
    register_shaper,
)
from megatron_vgpo.methods.metrics import MetricSums


class FocusScores(TokenStatistic):
    """rho (eqs. 2-4) from the final hidden states of the original view; 0 off-response."""

    needs_hidden_states = True

    def __init__(self, variant: str = "paper", eps: float = 1e-8):
        self.variant, self.eps = variant, eps
        self.name = f"focus[{variant},eps={eps:g}]"

    def compute(self, batch, output) -> torch.Tensor:
        return visual_focus_scores(output.hidden_states, batch.image_mask, batch.response_mask, self.variant,
                                   self.eps)


@register_shaper
class VGPOShaper(AdvantageShaper):
    """A'_{i,t} = A_{i,t} (1 + psi_{i,t}) (1 + phi_i) (eq. 12), ``vgpo/*`` diagnostics."""

    name = "vgpo"
    supports_current = True

    def __init__(self, config: VGPOConfig, current: bool = False):
        super().__init__(current)
        self.config = config
        self.focus = FocusScores(config.variant, config.eps)

    @classmethod
    def from_config(cls, algorithm, current: bool = False) -> "VGPOShaper":
        return cls(algorithm.vgpo, current)

    def statistics(self) -> tuple[TokenStatistic, ...]:
        return (self.focus,)

    @torch.no_grad()
    def shape(self, inputs: ShapingInputs) -> ShapingResult:
        cfg, mask, has_image = self.config, inputs.response_mask, inputs.has_image
        rho = inputs.stats[self.focus.key]
        traj = trajectory_weights(rho, mask, has_image, cfg)
        phi = inter_trajectory_factor(traj.s, has_image, inputs.group_ids, cfg)
        advantages = combine_advantages(inputs.advantages, traj.psi, phi, mask)
        valid = mask & has_image.unsqueeze(-1)
        metrics = MetricSums()
        metrics.mean("vgpo/rho_mean", rho[valid])
        metrics.mean("vgpo/late_early_ratio", late_early_ratio(rho.float().masked_fill(~valid, 0.0), valid))
        metrics.mean("vgpo/gate_fraction", traj.gate[valid].float())
        metrics.std("vgpo/psi_std", traj.psi[valid])
        metrics.std("vgpo/phi_std", phi[has_image])
        metrics.mean("vgpo/w_mean", traj.w[valid])
        return ShapingResult(advantages, inputs.loss_mask, metrics)

