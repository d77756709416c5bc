"""PAPO (METHODS_SPEC section 3): the perception KL, the loss term's value, gradient and metric sums,
the annealing factor, all by hand; a per-token loop reference written from the spec."""

import math

import pytest
import torch

from megatron_vgpo.methods import LossInputs
from megatron_vgpo.methods.papo import PAPOConfig, PAPOLoss, anneal, perception_kl

T = torch.tensor
B_ = torch.bool

# Tiny case: 2 rows, L = 4, 5 response tokens (N = 5); off-response positions hold garbage (nan, 7).
#   token  l (current)  l_aug   delta = clamp(l_aug - l, -20, 20)   kappa = min(e^d - d - 1, 10)
#   (0,0)  -1           -1       0                                    0
#   (0,1)  -2           -1       1                                    e - 2        = 0.71828183
#   (0,2)  -0.5         -2.5    -2                                    e^-2 + 1     = 1.13533528
#   (1,1)  -30           0       30 -> 20                             e^20 - 21    -> 10
#   (1,2)  -1           -4      -3                                    e^-3 + 2     = 2.04978707
#   sum kappa = 13.90340418;  sum(-l) = 1 + 2 + 0.5 + 30 + 1 = 34.5;  sum(-l_aug) = 1 + 1 + 2.5 + 0 + 4 = 8.5
NAN = float("nan")
L_CUR = T([[-1.0, -2.0, -0.5, NAN], [7.0, -30.0, -1.0, NAN]])
L_AUG = T([[-1.0, -1.0, -2.5, 7.0], [NAN, 0.0, -4.0, 7.0]])
MASK = T([[1, 1, 1, 0], [0, 1, 1, 0]], dtype=B_)
KAPPA = T([[0.0, 0.71828183, 1.13533528, 0.0], [0.0, 10.0, 2.04978707, 0.0]])
SUM_KAPPA = 13.90340418


def _term(**kwargs):
    term = PAPOLoss(PAPOConfig(**kwargs))
    (stat,) = term.statistics()
    return term, stat.key


def test_perception_kl_by_hand():
    torch.testing.assert_close(perception_kl(L_CUR, L_AUG, MASK), KAPPA)


def test_loss_value_and_metric_sums_by_hand():
    # PAPO-D defaults gamma 0.01, eta_o = eta_a = 0.03, no annealing:
    # token sum = -0.01 * 13.90340418 + 0.03 * 34.5 + 0.03 * 8.5 = -0.13903404 + 1.035 + 0.255 = 1.15096596
    term, key = _term()
    total, metrics = term.loss_sum(LossInputs(L_CUR, None, MASK, {key: L_AUG}, step=3, total_steps=10))
    assert total.dim() == 0
    torch.testing.assert_close(total, T(1.15096596))
    # metric sums, divided by N = 5 when logged: kl 2.78068084, entropy 6.9, entropy_aug 1.7, gamma 0.01
    n = 5.0
    assert float(metrics["kl"]) / n == pytest.approx(SUM_KAPPA / 5)
    assert float(metrics["entropy"]) / n == pytest.approx(6.9)
    assert float(metrics["entropy_aug"]) / n == pytest.approx(1.7)
    assert float(metrics["gamma"]) / n == pytest.approx(0.01)
    assert not any(v.requires_grad for v in metrics.values())


def test_gradient_by_hand():
    # d total / d l_t = -gamma d kappa_t / d l_t - eta_o, with d kappa / d l = 1 - e^delta (0 where clamped):
    #   (0,0): -0.01 * 0 - 0.03                 = -0.03
    #   (0,1): -0.01 * (1 - e) - 0.03           = -0.01281718
    #   (0,2): -0.01 * (1 - e^-2) - 0.03        = -0.03864665
    #   (1,1): kappa clamped at 10 -> 0; - 0.03 = -0.03
    #   (1,2): -0.01 * (1 - e^-3) - 0.03        = -0.03950213
    #   off-response: 0 (even under nan)
    term, key = _term()
    logprobs = L_CUR.clone().requires_grad_()
    aug = L_AUG.clone().requires_grad_()  # a leaf that asks for a gradient: PAPO must give it none
    total, _ = term.loss_sum(LossInputs(logprobs, None, MASK, {key: aug}, step=0, total_steps=1))
    total.backward()
    torch.testing.assert_close(logprobs.grad, T([[-0.03, -0.01281718, -0.03864665, 0.0],
                                                 [0.0, -0.03, -0.03950213, 0.0]]))
    assert aug.grad is None  # l_aug is a constant of the update


def _hand_formula(l, l_aug, mask, gamma, eta_o, eta_a):
    """The spec's L - L_dapo as a token sum, written directly with torch ops (for autograd)."""
    m = mask.float()
    l0 = torch.where(mask, l, torch.zeros_like(l))
    a0 = torch.where(mask, l_aug, torch.zeros_like(l_aug)).detach()
    delta = (a0 - l0).clamp(-20, 20)
    kappa = torch.clamp(delta.exp() - delta - 1, max=10)
    return -gamma * (kappa * m).sum() + eta_o * (-(l0 * m)).sum() + eta_a * (-(a0 * m)).sum()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_matches_autograd_of_the_hand_formula(seed):
    g = torch.Generator().manual_seed(seed)
    l = -torch.rand(4, 9, generator=g) * 5
    l_aug = l + torch.randn(4, 9, generator=g) * 2
    l_aug[0, :3] = l[0, :3] - 30.0  # kappa clamp region (delta -20 -> 10) and the delta clamp
    mask = torch.rand(4, 9, generator=g) > 0.25
    gamma, eta_o, eta_a = 0.05, 0.02, 0.07
    x = l.clone().requires_grad_()
    ref = _hand_formula(x, l_aug, mask, gamma, eta_o, eta_a)
    ref.backward()
    term, key = _term(gamma=gamma, eta_orig=eta_o, eta_aug=eta_a)
    y = l.clone().requires_grad_()
    total, _ = term.loss_sum(LossInputs(y, None, mask, {key: l_aug}, 0, 1))
    total.backward()
    torch.testing.assert_close(total, ref)
    torch.testing.assert_close(y.grad, x.grad)


# ----------------------------------------------------------------------------------------- anneal


@pytest.mark.parametrize("step,total,fraction,expected", [
    (0, 100, 0.5, 1.0),  # 1 - 0 / 50
    (10, 100, 0.5, 0.8),  # 1 - 10 / 50
    (25, 100, 0.5, 0.5),  # 1 - 25 / 50
    (50, 100, 0.5, 0.0),  # 1 - 50 / 50
    (80, 100, 0.5, 0.0),  # max(0, 1 - 80 / 50)
    (3, 10, 1.0, 0.7),  # 1 - 3 / 10
    (99, 100, 0.0, 1.0),  # fraction 0: no annealing
])
def test_anneal_by_hand(step, total, fraction, expected):
    assert anneal(step, total, fraction) == pytest.approx(expected)


def test_annealed_loss_by_hand():
    # step 25 of 100, anneal_fraction 0.5 -> factor 0.5:
    #   with the entropy weights: 0.5 * 1.15096596 = 0.57548298
    #   gamma only: -0.005 * 13.90340418 + 0.03 * (34.5 + 8.5) = -0.06951702 + 1.29 = 1.22048298
    _, key = _term()
    inputs = LossInputs(L_CUR, None, MASK, {key: L_AUG}, step=25, total_steps=100)
    total, metrics = PAPOLoss(PAPOConfig(anneal_fraction=0.5)).loss_sum(inputs)
    torch.testing.assert_close(total, T(0.57548298))
    assert float(metrics["gamma"]) / 5 == pytest.approx(0.005)
    total, _ = PAPOLoss(PAPOConfig(anneal_fraction=0.5, anneal_entropy=False)).loss_sum(inputs)
    torch.testing.assert_close(total, T(1.22048298))


# ------------------------------------------------------------------ loop reference, straight from the spec


def _reference(l, l_aug, mask, cfg, step, total_steps):
    """METHODS_SPEC section 3 one token at a time: (term token sum, {metric: token sum})."""
    factor = 1.0 if cfg.anneal_fraction <= 0 else max(0.0, 1.0 - step / (cfg.anneal_fraction * total_steps))
    ent_factor = factor if cfg.anneal_entropy else 1.0
    kl = ent = ent_aug = 0.0
    n = 0
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if not mask[i, t]:
                continue
            d = min(max(float(l_aug[i, t]) - float(l[i, t]), -20.0), 20.0)
            kl += min(math.exp(d) - d - 1.0, 10.0)
            ent += -float(l[i, t])
            ent_aug += -float(l_aug[i, t])
            n += 1
    total = -cfg.gamma * factor * kl + cfg.eta_orig * ent_factor * ent + cfg.eta_aug * ent_factor * ent_aug
    return total, {"kl": kl, "entropy": ent, "entropy_aug": ent_aug, "gamma": cfg.gamma * factor * n}


@pytest.mark.parametrize("cfg,step", [
    (PAPOConfig(), 0),
    (PAPOConfig(gamma=0.02, eta_orig=0.05, eta_aug=0.05), 7),
    (PAPOConfig(anneal_fraction=0.3, gamma=0.1), 4),
    (PAPOConfig(anneal_fraction=0.3, anneal_entropy=False, gamma=0.1), 4),
    (PAPOConfig(gamma=0.0, eta_orig=0.0, eta_aug=0.0), 2),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_loop_reference(cfg, step, seed):
    g = torch.Generator().manual_seed(seed)
    l = -torch.rand(5, 11, generator=g) * 6
    l_aug = l + torch.randn(5, 11, generator=g) * 3
    l_aug[1, ::2] = 0.0  # large positive delta -> kappa clamp at 10
    mask = torch.rand(5, 11, generator=g) > 0.3
    l = torch.where(mask, l, torch.full_like(l, float("nan")))  # garbage off the response
    term = PAPOLoss(cfg)
    (stat,) = term.statistics()
    total, metrics = term.loss_sum(LossInputs(l, None, mask, {stat.key: l_aug}, step, total_steps=20))
    ref_total, ref_metrics = _reference(l, l_aug, mask, cfg, step, 20)
    assert float(total) == pytest.approx(ref_total, rel=1e-5, abs=1e-5)
    for k, v in ref_metrics.items():
        assert float(metrics[k]) == pytest.approx(v, rel=1e-5, abs=1e-5), k


# --------------------------------------------------------------------------- declared needs, config


def test_declares_the_raw_per_prompt_mask_view():
    (stat,) = PAPOLoss(PAPOConfig()).statistics()
    v = stat.view
    assert (v.kind, v.p, v.cell, v.placement, v.per) == ("mask_patches", 0.6, 14, "raw", "prompt")
    assert PAPOLoss.name == "papo" and not PAPOLoss.needs_entropy


@pytest.mark.parametrize("kwargs,name", [({"gamma": -0.1}, "gamma"), ({"eta_orig": -1.0}, "eta_orig"),
                                         ({"eta_aug": -1.0}, "eta_aug"), ({"mask_prob": 1.2}, "mask_prob"),
                                         ({"anneal_fraction": 2.0}, "anneal_fraction")])
def test_config_validation_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PAPOConfig(**kwargs)
