"""One backward of the DAPO loss under TP2 x PP2 gives the gathered gradients of TP1 x PP1.

TP2 x PP2 runs ``grad_worker.py`` under torchrun (tied and untied checkpoints in one launch), TP1 x
PP1 the same code in this process (a world of one saves a launch); the gradients, gathered to the
full Megatron layout and mapped to HF names (which also removes the TP vocabulary padding), agree
to 1e-5 on every tensor, and none may be zero. (TP1 x PP1 itself is checked against HF autograd in
``tests/models/test_policy_model.py``.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from megatron_vgpo.models.qwen2_5_vl.config import arch_from_hf
from megatron_vgpo.models.qwen2_5_vl.name_mapping import megatron_to_hf
from tests.conftest import run_torchrun
from tests.distributed.grad_worker import full_gradients

WORKER = Path(__file__).with_name("grad_worker.py")


def load_grads(directory: Path) -> dict[str, torch.Tensor]:
    """Merge the per-stage files, adding the tied embedding's first- and last-stage contributions."""
    grads = {}
    for path in sorted(directory.glob("grads_pp*.pt")):
        for name, grad in torch.load(path).items():
            grads[name] = grads[name] + grad if name in grads else grad
    return grads


def as_hf(grads: dict, hf_config, tp: int) -> dict[str, torch.Tensor]:
    return dict(megatron_to_hf(grads.items(), arch_from_hf(hf_config, tp)))


@pytest.mark.distributed
@pytest.mark.slow
def test_tp2_pp2_gradients_equal_tp1_pp1(tiny_hf_dirs, tmp_path, world_of_one):
    dirs = [tiny_hf_dirs["untied"], tiny_hf_dirs["tied"]]
    run_torchrun(WORKER, 4, "--tp", 2, "--pp", 2, "--out", tmp_path, *dirs)
    for hf_dir in dirs:
        hf_config = AutoConfig.from_pretrained(hf_dir)
        ref = as_hf(full_gradients(hf_dir, world_of_one)[0], hf_config, 1)
        got = as_hf(load_grads(tmp_path / hf_dir.name), hf_config, 2)
        assert got.keys() == ref.keys()
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        print(f"{hf_dir.name}: {len(ref)} tensors, max |grad(TP2xPP2) - grad(TP1xPP1)| = {worst:.2e}")
        assert worst <= 1e-5
        assert all(ref[k].abs().max() > 0 for k in ref)
