"""VGPO shaping: every equation against hand-computed numbers, a loop reference, and properties."""

import math

import pytest
import torch

from megatron_vgpo.algorithms.vgpo import (
    visual_token_fractions,
    VGPOConfig,
    combine_advantages,
    inter_trajectory_factor,
    late_early_ratio,
    shape_advantages,
    trajectory_weights,
    vgpo_shape_advantages,
    visual_focus_scores,
)

T = torch.tensor
B_ = torch.bool


def _row(values, L, start=0):
    """A [L] rho row holding ``values`` from ``start`` and its response mask."""
    rho, mask = torch.zeros(L), torch.zeros(L, dtype=B_)
    rho[start:start + len(values)] = T(values)
    mask[start:start + len(values)] = True
    return rho, mask


# ------------------------------------------------------------------------ hand-computed equations


def test_focus_score_eqs_2_to_4_by_hand():
    # d = 2. Image tokens (1, 0) and (1, 2) -> mu_v = (1, 1) (eq. 2, mean pooling).
    # Response tokens: (1, 1) cos 1 -> rho 1; (1, -1) cos 0 -> rho 0.5; (-2, -2) cos -1 -> rho 0;
    # (1, 0) cos 1/sqrt(2) -> rho (1 + 0.70710678) / 2 = 0.85355339.
    h = T([[[1.0, 0.0], [1.0, 2.0], [1.0, 1.0], [1.0, -1.0], [-2.0, -2.0], [1.0, 0.0], [5.0, 5.0]]])
    image = T([[1, 1, 0, 0, 0, 0, 0]], dtype=B_)
    resp = T([[0, 0, 1, 1, 1, 1, 0]], dtype=B_)  # the last position is padding
    rho = visual_focus_scores(h, image, resp)
    torch.testing.assert_close(rho, T([[0, 0, 1.0, 0.5, 0.0, 0.85355339, 0]]), atol=1e-6, rtol=0)


def test_focus_score_official_min_max_over_the_micro_batch():
    # Raw cosines of the response tokens across both rows: 1, 0, -1 (row 0) and 1/sqrt(2) (row 1);
    # one min-max over all of them: (cos + 1) / 2 here since min = -1 and max = 1.
    h = T([[[1.0, 1.0], [1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]],
           [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    image = T([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=B_)
    resp = T([[0, 1, 1, 1], [0, 1, 0, 0]], dtype=B_)
    rho = visual_focus_scores(h, image, resp, variant="official")
    torch.testing.assert_close(rho, T([[0, 1.0, 0.5, 0.0], [0, 0.85355339, 0, 0]]), atol=1e-6, rtol=0)


def test_sample_without_image_has_zero_scores():
    h = torch.randn(2, 5, 4)
    image = T([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=B_)
    resp = T([[0, 1, 1, 1, 0], [0, 1, 1, 1, 0]], dtype=B_)
    rho = visual_focus_scores(h, image, resp)
    assert (rho[1] == 0).all() and (rho[0, 1:4] > 0).all()


# Response 0: rho = [0.6, 0.2, 0.9, 0.4], T = 4, gamma 0.5 -> tail t in {3, 4} = {0.9, 0.4};
#   kappa 0.2 -> k = max(1, floor(0.4)) = 1 -> Q = 0.9 -> gate only at t = 3.
#   w = [0.6, 0.2, 0.9 (1 + 0.3 * 3/4) = 1.1025, 0.4]                                  (eq. 5)
#   w_hat = (w - 0.2) / 0.9025 = [0.44321330, 0, 1, 0.22160665]                          (eq. 7)
#   psi = w_hat - 0.41620499 = [0.02700831, -0.41620498, 0.58379501, -0.19459834]      (eq. 8)
#   s = 2.3025                                                                            (eq. 9)
# Response 1 (same group): rho = [0.5, 0.7], T = 2 -> tail {t = 2}, gate at t = 2, c = 1;
#   w = [0.5, 0.91], w_hat = [0, 1], psi = [-0.5, 0.5], s = 1.41.
# Response 2 (same group): no image -> psi = 0, phi = 0, left out of the min-max.
# Group min-max of s: s_hat = [1, 0] -> mean 0.5 -> phi = [0.5, -0.5, 0]                 (eqs. 10-11)
# A = [1, -0.5, 2]:  A' = A (1 + psi)(1 + phi)                                           (eq. 12)
#   row 0: 1.5 (1 + psi) = [1.54051247, 0.87569252, 2.37569251, 1.20810249]
#   row 1: -0.5 * 0.5 (1 + psi) = [-0.125, -0.375];  row 2: 2 everywhere.
PSI0 = [0.02700831, -0.41620498, 0.58379501, -0.19459834]


def _hand_batch(L=6):
    r0, m0 = _row([0.6, 0.2, 0.9, 0.4], L, start=1)
    r1, m1 = _row([0.5, 0.7], L, start=2)
    r2, m2 = _row([0.3, 0.3, 0.3], L, start=0)
    rho, mask = torch.stack([r0, r1, r2]), torch.stack([m0, m1, m2])
    has_image = T([True, True, False])
    return rho, mask, has_image, T([1.0, -0.5, 2.0]), T([7, 7, 7])


def test_trajectory_weights_eqs_5_to_9_by_hand():
    rho, mask, has_image, _, _ = _hand_batch()
    tw = trajectory_weights(rho, mask, has_image, VGPOConfig())
    torch.testing.assert_close(tw.w[0, 1:5], T([0.6, 0.2, 1.1025, 0.4]))
    torch.testing.assert_close(tw.w[1, 2:4], T([0.5, 0.91]))
    assert tw.gate[0].tolist() == [False, False, False, True, False, False]
    assert tw.gate[1].tolist() == [False, False, False, True, False, False]
    assert not tw.gate[2].any()
    torch.testing.assert_close(tw.psi[0, 1:5], T(PSI0), atol=1e-6, rtol=0)
    torch.testing.assert_close(tw.psi[1, 2:4], T([-0.5, 0.5]), atol=1e-6, rtol=0)
    assert (tw.psi[2] == 0).all()
    torch.testing.assert_close(tw.s[:2], T([2.3025, 1.41]))


def test_inter_factor_and_final_advantage_eqs_10_to_12_by_hand():
    rho, mask, has_image, adv, gid = _hand_batch()
    out = shape_advantages(rho, mask, has_image, adv, gid, VGPOConfig())
    torch.testing.assert_close(out.phi, T([0.5, -0.5, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.advantages[0, 1:5], T([1.54051247, 0.87569252, 2.37569251, 1.20810249]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(out.advantages[1, 2:4], T([-0.125, -0.375]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.advantages[2], T([2.0, 2.0, 2.0, 0, 0, 0]))
    assert out.advantages[0, [0, 5]].eq(0).all() and out.advantages[1, [0, 1, 4, 5]].eq(0).all()


@pytest.mark.parametrize("schedule,c", [("linear", 0.75), ("exponential", 0.5625), ("step", 1.0)])
def test_schedules_by_hand(schedule, c):
    # The gated token of response 0 sits at t / T = 3/4: c = 0.75, 0.75^2 = 0.5625, 1[0.75 >= 0.5] = 1.
    rho, mask, has_image, _, _ = _hand_batch()
    tw = trajectory_weights(rho, mask, has_image, VGPOConfig(schedule=schedule))
    torch.testing.assert_close(tw.w[0, 3], T(0.9 * (1 + 0.3 * c)))


def test_step_schedule_threshold():
    # T = 4, gate region full, kappa 1: every token gated; step c = 1[t/T >= 0.5] -> t = 2, 3, 4.
    rho, mask = _row([0.5, 0.5, 0.5, 0.5], 4)
    cfg = VGPOConfig(schedule="step", region="full", kappa=1.0)
    tw = trajectory_weights(rho[None], mask[None], T([True]), cfg)
    torch.testing.assert_close(tw.w[0], T([0.5, 0.65, 0.65, 0.65]))


def test_gate_top_kappa_ties_pass_and_tail_boundary():
    # T = 10, gamma 0.3 -> tail t > 7 (t = 8, 9, 10; (1 - 0.3) * 10 is 7.000000000000001 in floats).
    # kappa 0.7 -> k = floor(0.7 * 3) = 2 -> Q = 2nd largest of {0.9, 0.9, 0.1} = 0.9 -> both 0.9 pass.
    rho, mask = _row([0.99] * 7 + [0.9, 0.9, 0.1], 10)
    tw = trajectory_weights(rho[None], mask[None], T([True]), VGPOConfig(gamma=0.3, kappa=0.7))
    assert tw.gate[0].tolist() == [False] * 7 + [True, True, False]
    # gamma 0.9, T = 10: (1 - 0.9) * 10 = 0.9999999999999998 in floats, still means t > 1.
    tw = trajectory_weights(rho[None], mask[None], T([True]), VGPOConfig(gamma=0.9, kappa=1.0))
    assert tw.gate[0].tolist() == [False] + [True] * 9


def test_official_variant_by_hand():
    # Response 0 of the hand batch, official: position ratio x = (t - 1) / (T - 1) -> the gated t = 3
    # has x = 2/3: w = 0.9 (1 + 0.3 * 2/3) = 1.08; w_hat = (w - 0.2) / 0.88 = [0.45454545, 0, 1, 0.22727273],
    # mean 0.42045455 -> 1 + psi = [1.03409091, 0.57954545, 1.57954545, 0.80681818] (inside [0.1, 2]);
    # s = sum(w_hat) = 1.68181818.  Response 1: x = 1 at t = 2, w = [0.5, 0.91], w_hat = [0, 1], s = 1.
    # s_hat over the group = [1, 0] -> phi = [0.5, -0.5] -> clamp(1 + phi, 0.9, 2) = [1.5, 0.9].
    rho, mask, has_image, adv, gid = _hand_batch()
    out = shape_advantages(rho, mask, has_image, adv, gid, VGPOConfig(variant="official"))
    torch.testing.assert_close(out.w[0, 3], T(1.08))
    torch.testing.assert_close(1 + out.psi[0, 1:5], T([1.03409091, 0.57954545, 1.57954545, 0.80681818]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(1 + out.phi[:2], T([1.5, 0.9]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.advantages[1, 2:4], T([-0.5 * 0.5 * 0.9, -0.5 * 1.5 * 0.9]), atol=1e-6, rtol=0)


def test_official_inter_only_follows_the_released_code():
    """intra off, variant official: the released code (verl/workers/actor/dp_actor.py, update_policy)
    has compensation and the gate inside its intra-trajectory branch only; its inter block then sums a
    per-row min-max of the raw (micro-batch min-maxed) score. Worked by hand from that logic:
      r0 rho [0.2, 0.4, 0.6, 0.9] -> min-max [0, 2/7, 4/7, 1]      -> s = 13/7 = 1.857142857
      r1 rho [0.9, 0.2, 0.5, 0.3] -> min-max [1, 0, 3/7, 1/7]      -> s = 11/7 = 1.571428571
      r2 rho [0.5, 0.5, 0.2, 0.8] -> min-max [0.5, 0.5, 0, 1]      -> s = 2
      s_hat = (s - 11/7) / (2 - 11/7) = [2/3, 0, 1], mean 5/9 -> 1 + phi = [1.1111, 0.4444 -> 0.9, 1.4444]
    With compensation (the old path, or intra on) the gated tail tokens change the sums (r1 and r2 swap
    order), so this case tells the two apart."""
    rows = [[0.2, 0.4, 0.6, 0.9], [0.9, 0.2, 0.5, 0.3], [0.5, 0.5, 0.2, 0.8]]
    rho, mask = T(rows), torch.ones(3, 4, dtype=B_)
    has_image, gid, adv = T([True, True, True]), T([3, 3, 3]), T([1.0, -1.0, 0.5])
    cfg = VGPOConfig(variant="official", intra=False)
    tw = trajectory_weights(rho, mask, has_image, cfg)
    torch.testing.assert_close(tw.s, T([13 / 7, 11 / 7, 2.0]), atol=1e-6, rtol=0)
    assert not tw.gate.any() and (tw.psi == 0).all() and torch.equal(tw.w, rho)
    out = shape_advantages(rho, mask, has_image, adv, gid, cfg)
    torch.testing.assert_close(1 + out.phi, T([10 / 9, 0.9, 13 / 9]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.advantages, T([[10 / 9] * 4, [-0.9] * 4, [0.5 * 13 / 9] * 4]), atol=1e-6, rtol=0)
    compensated = trajectory_weights(rho, mask, has_image, VGPOConfig(variant="official", intra=True))
    assert compensated.s[1] > compensated.s[0]  # the other path orders r0 and r1 the other way


def test_visual_token_fractions_as_the_released_code_logs_them():
    """visual_token_percentage_{first,second}_half of the released dp_actor.py, by hand:
    row 0, T = 5, rho [0.9, 0.1, 0.5, 0.8, 0.2]: k = max(1, int(0.4 * 5)) = 2, threshold 0.8 ->
      marked [1, 0, 0, 1, 0]; first floor(5 / 2) = 2 tokens hold 1 -> 0.2, the rest 1 -> 0.2.
    row 1, T = 4, rho [0.3, 0.3, 0.3, 0.1] (+ padding): k = 1, threshold 0.3, ties pass ->
      marked [1, 1, 1, 0]; first 2 hold 2 -> 0.5, the rest 1 -> 0.25.
    ratio = mean(late) / mean(early) = 0.225 / 0.35 = 0.642857..."""
    rho = T([[0.9, 0.1, 0.5, 0.8, 0.2], [0.3, 0.3, 0.3, 0.1, 0.99]])
    valid = T([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]], dtype=B_)
    early, late = visual_token_fractions(rho, valid)
    torch.testing.assert_close(early, T([0.2, 0.5]))
    torch.testing.assert_close(late, T([0.2, 0.25]))
    assert float(late.mean() / early.mean()) == pytest.approx(0.225 / 0.35)


def test_official_clamps():
    # psi' is clamped to [0.1, 2]: a response whose w_hat is [0, 0, 0, 0, 1] has mean 0.2 ->
    # 1 + psi = [0.8, 0.8, 0.8, 0.8, 1.8]; and [1, 0, 0, ...] with 20 tokens -> the 1 gives 1.95.
    # For the floor: w_hat = [1]*19 + [0] -> 1 + psi = 1 - 0.95 = 0.05 -> clamped to 0.1.
    rho, mask = _row([0.9] * 19 + [0.0], 20)
    cfg = VGPOConfig(variant="official", beta=0.0)
    tw = trajectory_weights(rho[None], mask[None], T([True]), cfg)
    torch.testing.assert_close(1 + tw.psi[0, 19], T(0.1))
    torch.testing.assert_close(1 + tw.psi[0, 0], T(1.05))
    # phi' floor 0.9: group s = [0, 1, 1, 1] -> s_hat mean 0.75 -> 1 + phi = [0.25 -> 0.9, 1.25, 1.25, 1.25].
    phi = inter_trajectory_factor(T([0.0, 1.0, 1.0, 1.0]), T([True] * 4), T([0, 0, 0, 0]), cfg)
    torch.testing.assert_close(1 + phi, T([0.9, 1.25, 1.25, 1.25]))


def test_late_early_ratio_by_hand():
    # T = 4: early = t <= 2 -> mean(0.2, 0.4) = 0.3; late = mean(0.6, 0.6) = 0.6 -> ratio 2.
    # T = 3: early = t <= 1.5 -> 0.5; late = mean(0.5, 0.2) = 0.35 -> 0.7.  T = 1 -> nan.
    rho = T([[0.2, 0.4, 0.6, 0.6], [0.5, 0.5, 0.2, 0.0], [0.7, 0, 0, 0]])
    mask = T([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=B_)
    r = late_early_ratio(rho, mask)
    torch.testing.assert_close(r[:2], T([2.0, 0.7]))
    assert math.isnan(r[2])


def test_metrics_by_hand():
    rho, mask, has_image, adv, gid = _hand_batch()
    m = shape_advantages(rho, mask, has_image, adv, gid, VGPOConfig()).metrics
    # Valid tokens: the 6 of responses 0 and 1. gate 2/6; rho mean (0.6+0.2+0.9+0.4+0.5+0.7)/6 = 0.55.
    assert m["gate_fraction"] == pytest.approx(2 / 6)
    assert m["rho_mean"] == pytest.approx(0.55)
    # late/early: response 0 -> mean(0.9, 0.4) / mean(0.6, 0.2) = 1.625; response 1 -> 0.7 / 0.5 = 1.4.
    assert m["late_early_ratio"] == pytest.approx((1.625 + 1.4) / 2)
    assert m["phi_std"] == pytest.approx(0.5)  # phi = [0.5, -0.5] over responses with an image
    psi = torch.tensor(PSI0 + [-0.5, 0.5])
    assert m["psi_std"] == pytest.approx(float(psi.std(unbiased=False)), abs=1e-6)


# ----------------------------------------------------------------- loop reference, straight from the spec


def _reference(h, image, resp, adv, gid, cfg):
    """Per-token Python loops over VGPO_SPEC.md, independent of the vectorised code."""
    B, L, _ = h.shape
    h = h.double()
    rho = torch.zeros(B, L, dtype=torch.float64)
    cos = torch.zeros(B, L, dtype=torch.float64)
    for i in range(B):
        imgs = [h[i, j] for j in range(L) if image[i, j]]
        if not imgs:
            continue
        mu = sum(imgs) / len(imgs)
        for j in range(L):
            if resp[i, j]:
                cos[i, j] = float(h[i, j] @ mu) / (float(h[i, j].norm() * mu.norm()) + cfg.eps)
    has = [bool(image[i].any()) for i in range(B)]
    valid_cos = [float(cos[i, j]) for i in range(B) for j in range(L) if resp[i, j] and has[i]]
    lo, hi = (min(valid_cos), max(valid_cos)) if valid_cos else (0.0, 0.0)
    for i in range(B):
        for j in range(L):
            if resp[i, j] and has[i]:
                c = float(cos[i, j])
                rho[i, j] = (c + 1) / 2 if cfg.variant == "paper" else (c - lo) / (hi - lo + cfg.eps)
    out = torch.zeros(B, L, dtype=torch.float64)
    psi_all, s = torch.zeros(B, L, dtype=torch.float64), [0.0] * B
    for i in range(B):
        pos = [j for j in range(L) if resp[i, j]]
        Ti = len(pos)
        if not has[i] or Ti == 0:
            continue
        tail = [k for k in range(1, Ti + 1) if cfg.region == "full" or k > round((1 - cfg.gamma) * Ti, 6)]
        vals = sorted((float(rho[i, pos[k - 1]]) for k in tail), reverse=True)
        q = vals[max(1, math.floor(round(cfg.kappa * len(tail), 6))) - 1] if tail else math.inf
        w = []
        for k in range(1, Ti + 1):
            r = float(rho[i, pos[k - 1]])
            x = k / Ti if cfg.variant == "paper" else ((k - 1) / (Ti - 1) if Ti > 1 else 0.0)
            c = {"linear": x, "exponential": x ** cfg.exponent, "step": float(x >= cfg.step_at)}[cfg.schedule]
            g = 1.0 if (k in tail and r >= q) else 0.0
            w.append(r * (1 + g * cfg.beta * c))
        wh = [(v - min(w)) / (max(w) - min(w) + cfg.eps) for v in w]
        m = sum(wh) / Ti
        for k in range(Ti):
            p = wh[k] - m
            if cfg.variant == "official":
                p = min(max(1 + p, 0.1), 2.0) - 1
            psi_all[i, pos[k]] = p if cfg.intra else 0.0
        s[i] = sum(wh) if cfg.variant == "official" else sum(w)
    phi = [0.0] * B
    for i in range(B):
        members = [j for j in range(B) if gid[j] == gid[i] and has[j]]
        if not has[i] or not cfg.inter:
            continue
        lo_s, hi_s = min(s[j] for j in members), max(s[j] for j in members)
        sh = {j: (s[j] - lo_s) / (hi_s - lo_s + cfg.eps) for j in members}
        p = sh[i] - sum(sh.values()) / len(members)
        phi[i] = min(max(1 + p, 0.9), 2.0) - 1 if cfg.variant == "official" else p
    for i in range(B):
        for j in range(L):
            if resp[i, j]:
                out[i, j] = float(adv[i]) * (1 + psi_all[i, j]) * (1 + phi[i])
    return out, rho, torch.tensor(phi, dtype=torch.float64)


def _random_batch(seed, B=10, L=24, d=16, groups=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, L, d, generator=g) + 0.3  # shift: cosines spread away from 0
    image = torch.zeros(B, L, dtype=B_)
    resp = torch.zeros(B, L, dtype=B_)
    for i in range(B):
        n_img = int(torch.randint(0, 4, (1,), generator=g))
        image[i, 1:1 + n_img] = True
        start = 5
        n = int(torch.randint(1, L - start + 1, (1,), generator=g))
        resp[i, start:start + n] = True
    image[0, 1:3] = True  # at least one sample with an image
    adv = torch.randn(B, generator=g)
    gid = torch.randint(0, groups, (B,), generator=g) * 1000 + 17
    return h, image, resp, adv, gid


CONFIGS = [
    VGPOConfig(),
    VGPOConfig(variant="official"),
    VGPOConfig(schedule="exponential", region="full", kappa=0.5),
    VGPOConfig(schedule="step", gamma=1.0, beta=1.0),
    VGPOConfig(intra=False),
    VGPOConfig(inter=False, variant="official"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.variant}-{c.schedule}-{c.region}-{c.intra}{c.inter}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(cfg, seed):
    h, image, resp, adv, gid = _random_batch(seed)
    out = vgpo_shape_advantages(h, image, resp, adv, gid, cfg)
    ref_adv, ref_rho, ref_phi = _reference(h, image, resp, adv, gid, cfg)
    torch.testing.assert_close(out.rho.double(), ref_rho, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.phi.double(), ref_phi, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.advantages.double(), ref_adv, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("seed", range(4))
def test_psi_centred_per_response_and_phi_per_group(seed):
    h, image, resp, adv, gid = _random_batch(seed)
    out = vgpo_shape_advantages(h, image, resp, adv, gid, VGPOConfig())
    has = image.any(-1)
    psi_mean = (out.psi * resp).sum(-1) / resp.sum(-1)
    torch.testing.assert_close(psi_mean, torch.zeros_like(psi_mean), atol=1e-6, rtol=0)
    for g in gid.unique():
        members = (gid == g) & has
        if members.any():
            assert abs(float(out.phi[members].mean())) < 1e-6
    assert (out.psi[~has] == 0).all() and (out.phi[~has] == 0).all()


def test_zero_advantage_stays_zero_and_outside_response_is_zero():
    h, image, resp, adv, gid = _random_batch(5)
    adv[::2] = 0.0
    out = vgpo_shape_advantages(h, image, resp, adv, gid, VGPOConfig())
    assert (out.advantages[::2] == 0).all()
    for name in ("advantages", "rho", "w", "psi"):
        assert (getattr(out, name)[~resp] == 0).all(), name
    assert not out.gate[~resp].any()


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_padding_changes_nothing(variant):
    h, image, resp, adv, gid = _random_batch(3, L=20)
    cfg = VGPOConfig(variant=variant)
    out = vgpo_shape_advantages(h, image, resp, adv, gid, cfg)
    pad = 7
    h2 = torch.cat([h, 50 * torch.randn(h.shape[0], pad, h.shape[2])], dim=1)  # garbage under the padding
    image2 = torch.cat([image, torch.zeros(h.shape[0], pad, dtype=B_)], dim=1)
    resp2 = torch.cat([resp, torch.zeros(h.shape[0], pad, dtype=B_)], dim=1)
    out2 = vgpo_shape_advantages(h2, image2, resp2, adv, gid, cfg)
    for name in ("advantages", "rho", "w", "psi", "gate"):
        torch.testing.assert_close(getattr(out2, name)[:, :20], getattr(out, name), atol=1e-6, rtol=0)
        assert not getattr(out2, name)[:, 20:].bool().any()
    torch.testing.assert_close(out2.phi, out.phi)


@pytest.mark.parametrize("variant", ["paper", "official"])
def test_row_permutation_permutes_outputs(variant):
    h, image, resp, adv, gid = _random_batch(4)
    cfg = VGPOConfig(variant=variant)
    out = vgpo_shape_advantages(h, image, resp, adv, gid, cfg)
    perm = torch.randperm(h.shape[0], generator=torch.Generator().manual_seed(0))
    outp = vgpo_shape_advantages(h[perm], image[perm], resp[perm], adv[perm], gid[perm], cfg)
    for name in ("advantages", "rho", "w", "psi", "phi", "gate"):
        torch.testing.assert_close(getattr(outp, name), getattr(out, name)[perm], atol=1e-6, rtol=0)
    for key in ("rho_mean", "gate_fraction", "psi_std", "phi_std", "late_early_ratio"):
        assert outp.metrics[key] == pytest.approx(out.metrics[key], abs=1e-6)


def test_response_of_length_one_gets_zero_psi():
    rho, mask = _row([0.8], 5, start=3)
    out = shape_advantages(rho[None], mask[None], T([True]), T([1.5]), T([0]), VGPOConfig())
    assert out.psi[0, 3] == 0 and out.advantages[0, 3] == pytest.approx(1.5)


def test_no_image_member_leaves_group_min_max():
    rho, mask, has_image, adv, gid = _hand_batch()
    full = shape_advantages(rho, mask, has_image, adv, gid, VGPOConfig())
    alone = shape_advantages(rho[:2], mask[:2], has_image[:2], adv[:2], gid[:2], VGPOConfig())
    torch.testing.assert_close(full.phi[:2], alone.phi)
    torch.testing.assert_close(full.advantages[:2], alone.advantages)


def test_split_over_ranks_equals_whole_batch():
    # What the trainer does when a group spans micro-batches / data-parallel ranks: per-trajectory terms
    # on each shard, s gathered, phi computed on the gathered vectors, each shard keeps its rows.
    h, image, resp, adv, gid = _random_batch(6, B=12)
    cfg = VGPOConfig()
    whole = vgpo_shape_advantages(h, image, resp, adv, gid, cfg)
    shards = [slice(0, 5), slice(5, 12)]
    trajs = [trajectory_weights(visual_focus_scores(h[s], image[s], resp[s]), resp[s], image[s].any(-1), cfg)
             for s in shards]
    phi = inter_trajectory_factor(torch.cat([t.s for t in trajs]), image.any(-1), gid, cfg)
    parts = [combine_advantages(adv[s], t.psi, phi[s], resp[s]) for s, t in zip(shards, trajs)]
    torch.testing.assert_close(torch.cat(parts), whole.advantages)


def test_ablation_switches():
    h, image, resp, adv, gid = _random_batch(7)
    base = vgpo_shape_advantages(h, image, resp, adv, gid, VGPOConfig())
    no_intra = vgpo_shape_advantages(h, image, resp, adv, gid, VGPOConfig(intra=False))
    no_inter = vgpo_shape_advantages(h, image, resp, adv, gid, VGPOConfig(inter=False))
    neither = vgpo_shape_advantages(h, image, resp, adv, gid, VGPOConfig(intra=False, inter=False))
    assert (no_intra.psi == 0).all() and torch.equal(no_intra.phi, base.phi)
    assert (no_inter.phi == 0).all() and torch.equal(no_inter.psi, base.psi)
    torch.testing.assert_close(neither.advantages, adv[:, None] * resp)  # plain outcome advantages
    # beta = 0: no compensation, w = rho.
    flat = vgpo_shape_advantages(h, image, resp, adv, gid, VGPOConfig(beta=0.0))
    torch.testing.assert_close(flat.w, flat.rho)
    # region: "late" gates only the tail; "full" may gate any token and gates more.
    late = base.gate
    full = vgpo_shape_advantages(h, image, resp, adv, gid, VGPOConfig(region="full")).gate
    t = resp.cumsum(-1)
    T_ = resp.sum(-1, keepdim=True)
    assert not (late & (t <= T_ * 0.5)).any()
    assert (full & (t <= T_ * 0.5)).any()


def test_config_rejects_bad_values_by_name():
    for kwargs, name in [({"gamma": 0.0}, "gamma"), ({"gamma": 1.5}, "gamma"), ({"kappa": 0}, "kappa"),
                         ({"beta": -1}, "beta"), ({"schedule": "cubic"}, "schedule"),
                         ({"variant": "x"}, "variant"), ({"region": "mid"}, "region")]:
        with pytest.raises(ValueError, match=f"^{name}="):
            VGPOConfig(**kwargs)


def test_bf16_hidden_states_accepted():
    h, image, resp, adv, gid = _random_batch(8)
    out32 = vgpo_shape_advantages(h, image, resp, adv, gid, VGPOConfig())
    out16 = vgpo_shape_advantages(h.bfloat16(), image, resp, adv, gid, VGPOConfig())
    assert out16.advantages.dtype == torch.float32
    torch.testing.assert_close(out16.rho, out32.rho, atol=1e-2, rtol=0)
