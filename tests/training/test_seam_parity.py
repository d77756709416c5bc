"""VGPO through the plug-in seam is the pre-seam VGPO, bit for bit, on the TP2 x PP2 loop (gloo, 4 CPU
ranks): the same old log-probs, focus scores and advantages, the same loss metrics, and the same
weights after one PPO update of two mini-batches whose micro-batches split groups."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import REPO, run_torchrun


VARIANTS = ("paper", "official")


@pytest.fixture(scope="module")
def seam_and_reference(tmp_path_factory) -> dict:
    """variant -> {"seam": ..., "reference": ...}: every variant in one 4-rank launch."""
    from megatron_vgpo.data.synthetic import write_synthetic_dataset
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("seam_parity")
    model = write_tiny_checkpoint(root / "tiny", TinyOptions(seed=0, init_std=0.1))
    data = write_synthetic_dataset(root / "data", train=8, val=2, seed=0)["train"]
    run_torchrun(REPO / "tests" / "training" / "seam_parity_worker.py", 4, model, data, root, ",".join(VARIANTS),
                 timeout=900)
    saved = sorted(root.glob("rank*.pt"))
    assert [p.name for p in saved] == ["rank2.pt"]  # the last stage's TP rank 0 (Megatron's rank order)
    return torch.load(saved[0], weights_only=False)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_vgpo_through_the_seam_is_bit_identical_under_tp2_pp2(seam_and_reference, variant):
    seam, ref = seam_and_reference[variant]["seam"], seam_and_reference[variant]["reference"]
    for key in ("old_logprobs", "rho", "advantages"):
        assert torch.equal(seam[key], ref[key]), key
    assert (seam["advantages"] != 0).sum() > 50  # a real signal, not zeros on both sides
    shared = {k for k in ref["metrics"] if k.startswith("actor/")}
    assert shared and all(seam["metrics"][k] == ref["metrics"][k] for k in shared), (seam["metrics"], ref["metrics"])
    assert seam["weights"].keys() == ref["weights"].keys()
    assert all(torch.equal(seam["weights"][k], ref["weights"][k]) for k in ref["weights"])
