"""VGPO through the plug-in seam: the shaper equals the direct composition of ``algorithms/vgpo.py`` bit
for bit, its metrics equal the old ``vgpo_metrics``, and with ``hidden_states_from=current`` the
per-micro-batch shaping equals the whole-batch one when micro-batches hold whole groups (which the
config validation enforces)."""

from types import SimpleNamespace

import pytest
import torch

from megatron_vgpo.algorithms.vgpo import (
    VGPOConfig,
    combine_advantages,
    inter_trajectory_factor,
    shape_advantages,
    trajectory_weights,
    visual_focus_scores,
)
from megatron_vgpo.config import ConfigError, load_config, validate
from megatron_vgpo.config.schema import AlgorithmConfig
from megatron_vgpo.methods import ShapingInputs, apply_shapers, build_methods
from megatron_vgpo.methods.vgpo import FocusScores, VGPOShaper

B_ = torch.bool


def _batch(seed, B=9, L=16, d=8, group_size=3):
    """Hidden states, image / response masks, outcome advantages and group ids; row 4 has no image."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, d, generator=g) + 0.3
    image = torch.zeros(B, L, dtype=B_)
    image[:, 1:4] = True
    image[4] = False
    resp = torch.zeros(B, L, dtype=B_)
    for i in range(B):
        n = int(torch.randint(1, L - 5 + 1, (1,), generator=g))
        resp[i, 5:5 + n] = True
    outcome = torch.randn(B, generator=g)
    outcome[2] = 0.0
    gid = torch.arange(B) // group_size * 100 + 11
    return h, image, resp, outcome, gid


def _inputs(rho, resp, image, outcome, gid, key):
    return ShapingInputs(
        advantages=outcome.unsqueeze(-1) * resp, outcome=outcome, response_mask=resp, loss_mask=resp.clone(),
        group_ids=gid, has_image=image.any(-1), old_logprobs=torch.zeros(resp.shape), stats={key: rho})


CONFIGS = [VGPOConfig(variant=v, intra=i, inter=j) for v in ("paper", "official")
           for i in (True, False) for j in (True, False)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.variant}-intra{int(c.intra)}-inter{int(c.inter)}")
@pytest.mark.parametrize("seed", [0, 1])
def test_shaper_equals_direct_composition_bit_for_bit(cfg, seed):
    h, image, resp, outcome, gid = _batch(seed)
    has_image = image.any(-1)
    rho = visual_focus_scores(h, image, resp, cfg.variant, cfg.eps)
    shaper = VGPOShaper(cfg)
    result = shaper.shape(_inputs(rho, resp, image, outcome, gid, shaper.focus.key))
    traj = trajectory_weights(rho, resp, has_image, cfg)
    phi = inter_trajectory_factor(traj.s, has_image, gid, cfg)
    direct = combine_advantages(outcome, traj.psi, phi, resp)
    assert torch.equal(result.advantages, direct)
    assert torch.equal(result.advantages, shape_advantages(rho, resp, has_image, outcome, gid, cfg).advantages)
    assert torch.equal(result.loss_mask, resp)  # VGPO never narrows the loss mask


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_focus_statistic_equals_visual_focus_scores(variant):
    h, image, resp, _, _ = _batch(3)
    stat = FocusScores(variant, 1e-8)
    got = stat.compute(SimpleNamespace(image_mask=image, response_mask=resp), SimpleNamespace(hidden_states=h))
    assert torch.equal(got, visual_focus_scores(h, image, resp, variant, 1e-8))
    assert stat.needs_hidden_states and stat.view.kind == "original"
    assert stat.key != FocusScores("paper" if variant == "official" else "official").key  # variants never share


@pytest.mark.parametrize("cfg", [VGPOConfig(), VGPOConfig(variant="official"), VGPOConfig(inter=False)],
                         ids=["paper", "official", "no-inter"])
def test_metrics_equal_the_old_vgpo_metrics(cfg):
    h, image, resp, outcome, gid = _batch(5)
    rho = visual_focus_scores(h, image, resp, cfg.variant, cfg.eps)
    shaper = VGPOShaper(cfg)
    new = shaper.shape(_inputs(rho, resp, image, outcome, gid, shaper.focus.key)).metrics.reduce()
    old = shape_advantages(rho, resp, image.any(-1), outcome, gid, cfg).metrics
    assert set(new) == {f"vgpo/{k}" for k in old}
    for k, v in old.items():
        assert new[f"vgpo/{k}"] == pytest.approx(v, abs=1e-6), k


# ------------------------------------------------------------------ current policy, per micro-batch


def _per_micro_batch(methods, h, image, resp, outcome, gid, size):
    """What the actor's loss function does with ``hidden_states_from=current``: per micro-batch of
    ``size`` consecutive rows, cut to the micro-batch's own width, the current statistics then the
    current-policy shapers. Returns the advantages re-assembled at full width."""
    B, L = resp.shape
    out = torch.zeros(B, L)
    for start in range(0, B, size):
        rows = slice(start, start + size)
        width = int(resp[rows].nonzero()[:, 1].max()) + 1
        mb = SimpleNamespace(image_mask=image[rows, :width], response_mask=resp[rows, :width])
        stats = {s.key: s.compute(mb, SimpleNamespace(hidden_states=h[rows, :width]))
                 for s in methods.current_statistics()}
        m_resp = resp[rows, :width]
        result = apply_shapers(methods.current_shapers, ShapingInputs(
            outcome[rows].unsqueeze(-1) * m_resp, outcome[rows], m_resp, m_resp.clone(), gid[rows],
            image[rows].any(-1), torch.zeros(m_resp.shape), stats))
        out[rows, :width] = result.advantages
    return out


def test_group_aligned_micro_batches_equal_the_whole_batch():
    h, image, resp, outcome, gid = _batch(7, B=12, group_size=3)
    methods = build_methods(AlgorithmConfig(shapers=["vgpo"], hidden_states_from="current"))
    assert [s.name for s in methods.current_shapers] == ["vgpo"] and methods.old_shapers == []
    assert methods.update_needs_hidden_states and methods.views()[0].kind == "original"
    whole = _per_micro_batch(methods, h, image, resp, outcome, gid, size=12)
    for size in (3, 6):  # whole groups per micro-batch
        got = _per_micro_batch(methods, h, image, resp, outcome, gid, size)
        torch.testing.assert_close(got, whole, atol=1e-6, rtol=0)
    # a micro-batch that splits a group sees only part of it: phi, hence the advantages, change
    split = _per_micro_batch(methods, h, image, resp, outcome, gid, size=4)
    assert not torch.allclose(split, whole, atol=1e-4)


def test_whole_batch_current_equals_the_pi_old_path():
    # With one micro-batch the current-policy path computes what the pi_old path computes on the same
    # hidden states.
    h, image, resp, outcome, gid = _batch(8)
    methods = build_methods(AlgorithmConfig(shapers=["vgpo"], hidden_states_from="current"))
    got = _per_micro_batch(methods, h, image, resp, outcome, gid, size=len(outcome))
    expected = shape_advantages(visual_focus_scores(h, image, resp), resp, image.any(-1), outcome, gid,
                                VGPOConfig()).advantages
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_current_mode_needs_group_aligned_micro_batches():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algorithm.hidden_states_from=current", "rollout.n=4", "trainer.micro_batch_size=6"])
    assert "trainer.micro_batch_size" in str(e.value) and "rollout.n" in str(e.value)
    cfg = load_config(None, ["algorithm.hidden_states_from=current", "rollout.n=4", "trainer.micro_batch_size=8"])
    validate(cfg)
    cfg.trainer.micro_batch_size = 2
    with pytest.raises(ConfigError, match=r"trainer\.micro_batch_size=2.*rollout\.n=4"):
        validate(cfg)
    # the pi_old path has no such constraint
    load_config(None, ["rollout.n=4", "trainer.micro_batch_size=3"])


def test_current_mode_refuses_shapers_that_need_the_pi_old_pass():
    with pytest.raises(ValueError, match="algorithm.hidden_states_from=current"):
        build_methods(AlgorithmConfig(shapers=["vppo"], hidden_states_from="current"))
    with pytest.raises(ConfigError, match="algorithm.hidden_states_from=current"):
        load_config(None, ["algorithm.shapers=[vppo]", "algorithm.hidden_states_from=current",
                           "trainer.micro_batch_size=8"])
    # a pi_old shaper before a current one is fine; after it, it is refused (they run inside the update)
    methods = build_methods(AlgorithmConfig(shapers=["vppo", "vgpo"], hidden_states_from="current"))
    assert [s.name for s in methods.old_shapers] == ["vppo"] and [s.name for s in methods.current_shapers] == ["vgpo"]
    with pytest.raises(ValueError, match="list them last"):
        build_methods(AlgorithmConfig(shapers=["vgpo", "vppo"], hidden_states_from="current"))
