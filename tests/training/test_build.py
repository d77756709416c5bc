"""``build_trainer`` refuses, by name and before any process group or model exists, the settings the
trainer does not implement (instead of silently ignoring them)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from megatron_vgpo.config import load_config
from megatron_vgpo.training.build import build_trainer
from tests.conftest import REPO


@pytest.mark.parametrize("override, field", [("algorithm.hidden_states_from=current", "algorithm.hidden_states_from"),
                                             ("algorithm.kl_coef=0.01", "algorithm.kl_coef")])
def test_unimplemented_settings_are_refused_by_name(override, field):
    cfg = load_config(REPO / "examples" / "configs" / "cpu_tiny.yaml", [override])
    with pytest.raises(ValueError, match=field):
        build_trainer(object, cfg)
    assert not dist.is_initialized()
