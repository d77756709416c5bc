"""VPPO (METHODS_SPEC section 2): visual dependency, token filter, trajectory scale and the entropy
penalty against hand-computed numbers; the whole shaper against a per-token loop reference written
from the spec; properties; the ``batch`` scope reduced over two gloo ranks."""

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from megatron_vgpo.algorithms.dapo import dapo_policy_loss
from megatron_vgpo.methods import LossInputs, ShapingInputs
from megatron_vgpo.methods.vppo import (
    SampleEntropyPenalty,
    VPPOConfig,
    VPPOShaper,
    token_filter,
    trajectory_scale,
    visual_dependency,
)
from tests.conftest import run_torchrun

T = torch.tensor
B_ = torch.bool
WORKER = Path(__file__).with_name("dp_scope_worker.py")


def _inputs(l_aug, l_old, mask, outcome, group_ids, loss_mask=None, minibatches=(), micro_batch_size=1,
            cfg=None):
    key = VPPOShaper(cfg or VPPOConfig()).aug.key
    B, _ = mask.shape
    return ShapingInputs(
        advantages=outcome.unsqueeze(-1) * mask, outcome=outcome, response_mask=mask,
        loss_mask=mask.clone() if loss_mask is None else loss_mask, group_ids=group_ids,
        has_image=torch.ones(B, dtype=B_), old_logprobs=l_old, stats={key: l_aug}, minibatches=minibatches,
        micro_batch_size=micro_batch_size)


# ------------------------------------------------------------------------------ visual dependency


def test_visual_dependency_by_hand():
    # D = clamp(k3(l_aug, l_old), 0, 10), k3 = exp(d) - d - 1 with d = clamp(l_aug - l_old, -20, 20):
    #   d = 0                         -> 0
    #   d = -1 - (-2) = 1             -> e - 2           = 0.71828183
    #   d = -3 - (-1) = -2            -> e^-2 + 2 - 1    = 1.13533528
    #   d = -1 - (-3.5) = 2.5         -> e^2.5 - 3.5     = 8.68249396
    #   d = 3                         -> e^3 - 4 = 16.09 -> 10 (the D clamp)
    #   l_old = -inf, d = +inf -> 20  -> e^20 - 21       -> 10 (unclamped: inf - inf = nan)
    #   l_aug = -inf, d = -inf -> -20 -> e^-20 + 19      -> 10 (unclamped: inf -> 10 too)
    #   padding: nan in both          -> 0
    nan, inf = float("nan"), float("inf")
    l_aug = T([[-1.0, -1.0, -3.0, -1.0, 0.0, 0.0, -inf, nan]])
    l_old = T([[-1.0, -2.0, -1.0, -3.5, -3.0, -inf, 0.0, nan]])
    mask = T([[1, 1, 1, 1, 1, 1, 1, 0]], dtype=B_)
    D = visual_dependency(l_aug, l_old, mask)
    torch.testing.assert_close(D, T([[0.0, 0.71828183, 1.13533528, 8.68249396, 10.0, 10.0, 10.0, 0.0]]))


# ---------------------------------------------------------------------------------- token filter


def test_token_filter_by_hand_with_ties():
    D = T([
        # T = 5, rho 0.4: k = ceil(0.4 * 5) = 2.
        # D sorted: 0.9 (t=1), then the tie 0.5 (t=2) / 0.5 (t=4): the earlier one, t=2, is kept.
        [0.3, 0.9, 0.5, 0.2, 0.5, 0.0, 0.0],
        # T = 4, all D = 0 (both passes agree): k = ceil(1.6) = 2 -> the first two tokens.
        [0.0, 0.0, 0.0, 0.0, 7.0, 7.0, 7.0],  # positions 4..6 are padding with garbage D
        # T = 6 from position 1, D = 10 (clamp) at t = 1, 3, 4, 5: k = ceil(2.4) = 3 -> t = 1, 3, 4.
        [9.0, 10.0, 0.2, 10.0, 10.0, 10.0, 0.0],
    ])
    mask = T([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1]], dtype=B_)
    keep = token_filter(D, mask, 0.4)
    assert keep.int().tolist() == [[0, 1, 1, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0, 0, 0],
                                   [0, 1, 0, 1, 1, 0, 0]]


@pytest.mark.parametrize("fraction,T_,k", [
    (0.4, 5, 2),  # 0.4 * 5 is exactly 2.0 in binary64: 2, not 3
    (0.07, 100, 7),  # 0.07 * 100 is 7.000000000000001: a bare ceil would keep 8
    (0.14, 50, 7),  # 7.000000000000001
    (0.55, 100, 55),  # 55.00000000000001
    (0.1, 3, 1),  # 0.30000000000000004 -> a true ceiling: 1
    (0.4, 3, 2),  # 1.2000000000000002 -> 2
    (0.4, 1, 1),  # 0.4 -> 1: every response keeps at least one token
    (1.0, 9, 9),
])
def test_token_filter_count_is_ceil_of_rho_T(fraction, T_, k):
    D = torch.rand(1, T_ + 2, generator=torch.Generator().manual_seed(T_))
    mask = torch.zeros(1, T_ + 2, dtype=B_)
    mask[0, 1:1 + T_] = True
    keep = token_filter(D, mask, fraction)
    assert int(keep.sum()) == k
    assert not keep[~mask].any()
    # the kept tokens are the k largest D of the response
    assert D[keep].min() >= D[mask & ~keep].max() if k < T_ else True


# ------------------------------------------------------------------------------- trajectory scale

S6 = T([0.2, 0.6, 1.0, 0.4, 0.4, 0.7], dtype=torch.float64)
G6 = T([7, 7, 7, 3, 3, 3])


def test_trajectory_scale_batch_scope_by_hand():
    # lo = 0.2, hi = 1.0: s~ = (S - 0.2) / 0.8 = [0, 0.5, 1, 0.25, 0.25, 0.625], mu = 2.625 / 6 = 0.4375
    # alpha = 0.9 + 0.1 s~ / 0.4375 = [0.9, 1.0142857, 1.1285714, 0.9571429, 0.9571429, 1.0428571] (mean 1)
    alpha = trajectory_scale(S6, 0.9, "batch", G6)
    torch.testing.assert_close(alpha, T([0.9, 1.0142857, 1.1285714, 0.9571429, 0.9571429, 1.0428571]))
    assert alpha.double().mean().item() == pytest.approx(1.0, abs=1e-6)


def test_trajectory_scale_group_scope_by_hand():
    # group 7: S = [0.2, 0.6, 1.0] -> s~ = [0, 0.5, 1], mu = 0.5 -> alpha = 0.9 + 0.2 s~ = [0.9, 1.0, 1.1]
    # group 3: S = [0.4, 0.4, 0.7] -> s~ = [0, 0, 1], mu = 1/3 -> alpha = 0.9 + 0.3 s~ = [0.9, 0.9, 1.2]
    alpha = trajectory_scale(S6, 0.9, "group", G6)
    torch.testing.assert_close(alpha, T([0.9, 1.0, 1.1, 0.9, 0.9, 1.2]))


def test_trajectory_scale_official_scope_by_hand():
    # Mini-batches (positions) [0, 1, 2] and [3, 4, 5], micro_batch_size 2 -> micro-batches
    # {0, 1}, {2}, {3, 4}, {5}. lo / hi per mini-batch, mu per micro-batch:
    #   mini-batch 0: lo 0.2, hi 1.0 -> s~ = [0, 0.5, 1]
    #     micro {0, 1}: mu = 0.25 -> alpha = 0.9 + 0.1 * [0, 0.5] / 0.25 = [0.9, 1.1]
    #     micro {2}:    mu = 1    -> alpha = 0.9 + 0.1 * 1 / 1 = 1.0
    #   mini-batch 1: lo 0.4, hi 0.7 -> s~ = [0, 0, 1]
    #     micro {3, 4}: mu = 0 (both at the minimum) -> alpha = b_min = 0.9
    #     micro {5}:    mu = 1 -> 1.0
    alpha = trajectory_scale(S6, 0.9, "official", G6, minibatches=[[0, 1, 2], [3, 4, 5]], micro_batch_size=2)
    torch.testing.assert_close(alpha, T([0.9, 1.1, 1.0, 0.9, 0.9, 1.0]))
    # micro_batch_size 3: mu over each whole mini-batch: mb0 mu 0.5 -> [0.9, 1.0, 1.1]; mb1 mu 1/3 -> [0.9, 0.9, 1.2]
    alpha = trajectory_scale(S6, 0.9, "official", G6, minibatches=[[0, 1, 2], [3, 4, 5]], micro_batch_size=3)
    torch.testing.assert_close(alpha, T([0.9, 1.0, 1.1, 0.9, 0.9, 1.2]))
    # One mini-batch [2, 0, 1, 5, 3, 4] (positions, in training order), micro_batch_size 3: lo / hi over all
    # six rows as the batch scope; micro {2, 0, 1}: s~ = [1, 0, 0.5], mu 0.5 -> [1.1, 0.9, 1.0];
    # micro {5, 3, 4}: s~ = [0.625, 0.25, 0.25], mu 0.375 -> 0.9 + 0.1 s~ / 0.375 -> [1.0666667, 0.9666667, 0.9666667]
    alpha = trajectory_scale(S6, 0.9, "official", G6, minibatches=[[2, 0, 1, 5, 3, 4]], micro_batch_size=3)
    torch.testing.assert_close(alpha, T([0.9, 1.0, 1.1, 0.9666667, 0.9666667, 1.0666667]))


def test_official_with_one_micro_batch_per_step_equals_batch_scope():
    g = torch.Generator().manual_seed(0)
    S, gid = torch.rand(9, generator=g, dtype=torch.float64), torch.arange(9) // 3
    official = trajectory_scale(S, 0.8, "official", gid, minibatches=[list(range(9))], micro_batch_size=9)
    torch.testing.assert_close(official, trajectory_scale(S, 0.8, "batch", gid))


def test_trajectory_scale_degenerate_cases():
    gid = T([0, 0, 0])
    # fewer than 2 rows in the scope -> alpha 1
    assert trajectory_scale(T([0.7], dtype=torch.float64), 0.9, "batch", T([0])).tolist() == [1.0]
    # a group of one row in the group scope -> 1 for it; the other group as usual ([0.9, 1.1])
    alpha = trajectory_scale(T([0.3, 0.1, 0.5], dtype=torch.float64), 0.9, "group", T([4, 8, 8]))
    torch.testing.assert_close(alpha, T([1.0, 0.9, 1.1]))
    # hi - lo <= 1e-6 -> alpha 1 (all equal, or 1e-7 apart)
    assert trajectory_scale(T([0.5, 0.5, 0.5], dtype=torch.float64), 0.9, "batch", gid).tolist() == [1.0] * 3
    assert trajectory_scale(T([0.5, 0.5 + 1e-7, 0.5], dtype=torch.float64), 0.9, "batch", gid).tolist() == [1.0] * 3
    # 1e-5 apart is not degenerate: s~ = [0, 1, 0], mu = 1/3 -> [0.9, 0.9 + 0.3, 0.9]
    alpha = trajectory_scale(T([0.5, 0.5 + 1e-5, 0.5], dtype=torch.float64), 0.9, "batch", gid)
    torch.testing.assert_close(alpha, T([0.9, 1.2, 0.9]))
    # official: a degenerate mini-batch gets 1, the other one as usual; mu = 0 micro-batch -> b_min (0.75)
    S = T([0.4, 0.4, 0.1, 0.1, 0.9], dtype=torch.float64)
    alpha = trajectory_scale(S, 0.75, "official", T([0, 0, 1, 1, 1]), minibatches=[[0, 1], [2, 3, 4]],
                             micro_batch_size=2)
    # mb0 S = [0.4, 0.4]: hi - lo = 0 -> [1, 1]; mb1 s~ = [0, 0, 1]: micro {2, 3} mu 0 -> 0.75 each,
    # micro {4} mu 1 -> 0.75 + 0.25 * 1 = 1.0
    torch.testing.assert_close(alpha, T([1.0, 1.0, 0.75, 0.75, 1.0]))


def test_official_depends_on_row_order_by_design():
    perm = T([3, 0, 4, 1, 5, 2])
    mb = [[0, 1, 2], [3, 4, 5]]
    base = trajectory_scale(S6, 0.9, "official", G6, minibatches=mb, micro_batch_size=2)
    permuted = trajectory_scale(S6[perm], 0.9, "official", G6[perm], minibatches=mb, micro_batch_size=2)
    assert not torch.allclose(permuted, base[perm])
    for scope in ("batch", "group"):  # the layout-independent scopes do not
        base = trajectory_scale(S6, 0.9, scope, G6, minibatches=mb, micro_batch_size=2)
        assert torch.equal(trajectory_scale(S6[perm], 0.9, scope, G6[perm], minibatches=mb, micro_batch_size=2),
                           base[perm])


# ------------------------------------------------------------------------ the shaper, by hand

# Row 0 (group 7, A = 1), response positions 0..2: l_aug - l_old = [0, 1, -1]
#   D = [0, e - 2, e^-1] = [0, 0.71828183, 0.36787944]; k = ceil(0.4 * 3) = 2 -> keep t = 1, 2
#   S0 = 1.08616127 / 3 = 0.36205376
# Row 1 (group 7, A = -0.5), positions 1..2: d = [2, 3] -> D = [e^2 - 3, 10] = [4.38905610, 10]
#   k = ceil(0.8) = 1 -> keep t = 2 (D = 10);  S1 = 14.38905610 / 2 = 7.19452805
# Row 2 (group 9, A = 2), positions 0..1: l_aug = l_old -> D = [0, 0], k = 1 -> keep t = 0 (tie: the earlier)
#   S2 = 0
# batch scope: lo = 0, hi = 7.19452805 -> s~ = [0.05032349, 1, 0], mu = 0.35010783
#   alpha = 0.9 + 0.1 s~ / mu = [0.91437371, 1.18562628, 0.9]
#   A' = alpha A = [0.91437371, -0.59281314, 1.8]
HAND_MASK = T([[1, 1, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=B_)
HAND_OLD = T([[-1.0, -1.0, -1.0, 0.0], [0.0, -2.5, -3.5, 0.0], [-0.7, -1.3, 0.0, 0.0]])
HAND_AUG = T([[-1.0, 0.0, -2.0, 5.0], [9.0, -0.5, -0.5, 5.0], [-0.7, -1.3, 5.0, 5.0]])  # 5, 9: garbage off-response
HAND_A = T([1.0, -0.5, 2.0])
HAND_G = T([7, 7, 9])


def test_shaper_by_hand():
    result = VPPOShaper(VPPOConfig()).shape(_inputs(HAND_AUG, HAND_OLD, HAND_MASK, HAND_A, HAND_G))
    torch.testing.assert_close(result.advantages, T([[0.91437371] * 3 + [0],
                                                     [0, -0.59281314, -0.59281314, 0],
                                                     [1.8, 1.8, 0, 0]]))
    assert result.loss_mask.int().tolist() == [[0, 1, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0]]
    m = result.metrics.reduce()
    # D mean over the 7 response tokens: (1.08616127 + 14.38905610 + 0) / 7; kept 4 / 7;
    # alpha mean (0.91437371 + 1.18562628 + 0.9) / 3 = 1 (batch scope: mean 1), min 0.9, max 1.18562628
    assert m["vppo/visual_dependency"] == pytest.approx((1.08616127 + 14.38905610) / 7)
    assert m["vppo/kept_fraction"] == pytest.approx(4 / 7)
    assert m["vppo/alpha_mean"] == pytest.approx(1.0, abs=1e-6)
    assert m["vppo/alpha_min"] == pytest.approx(0.9) and m["vppo/alpha_max"] == pytest.approx(1.18562628)


def test_shaper_narrows_an_earlier_loss_mask_and_scales_token_level_advantages():
    # An earlier shaper already dropped row 0, t = 1 and left token-level advantages: the filter only
    # narrows (AND) and alpha multiplies whatever advantages it is given.
    loss_mask = HAND_MASK.clone()
    loss_mask[0, 1] = False
    inputs = _inputs(HAND_AUG, HAND_OLD, HAND_MASK, HAND_A, HAND_G, loss_mask=loss_mask)
    inputs.advantages = inputs.advantages * T([[1.0, 2.0, 3.0, 4.0]])
    result = VPPOShaper(VPPOConfig()).shape(inputs)
    assert result.loss_mask.int().tolist() == [[0, 0, 1, 0], [0, 0, 1, 0], [1, 0, 0, 0]]
    torch.testing.assert_close(result.advantages[0, :3], 0.91437371 * T([1.0, 2.0, 3.0]))


# -------------------------------------------------------------- the filter in the DAPO loss (N unchanged)


def test_filtered_tokens_count_in_the_token_mean_denominator():
    # ratio r = exp(l - l_old); eps_low 0.2, eps_high 0.28, dual clip c = 3; per-token loss
    # max(-A r, -A clip(r, 0.8, 1.28)) (then min(., 3|A|) for A < 0):
    #   row 0: A = [1, 1, -1, -1], r = [1.1, 1.5, 0.9, 0.5] -> [-1.1, -1.28, 0.9, 0.8], keep [1, 0, 1, 0]
    #   row 1: A = 0.5, r = [1.0, 1.2] -> [-0.5, -0.6], keep [0, 1]; position 2: padding
    # kept sum = -1.1 + 0.9 - 0.6 = -0.8; N = all 6 response tokens -> loss = -0.8 / 6
    # (not -0.8 / 3 over the kept tokens; unfiltered: -1.78 / 6)
    ratio = T([[1.1, 1.5, 0.9, 0.5], [1.0, 1.2, 1.0, 1.0]])
    old = torch.full((2, 4), -1.0)
    logprobs = (old + ratio.log()).requires_grad_()
    adv = T([[1.0, 1.0, -1.0, -1.0], [0.5, 0.5, 0.0, 0.0]])
    mask = T([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=B_)
    keep = T([[1, 0, 1, 0], [0, 1, 0, 0]], dtype=B_)
    out = dapo_policy_loss(logprobs, old, adv, mask, global_num_tokens=int(mask.sum()), pg_mask=keep)
    torch.testing.assert_close(out.loss, T(-0.8 / 6))
    assert float(out.metric_sums["num_tokens"]) == 6.0
    unfiltered = dapo_policy_loss(logprobs, old, adv, mask, global_num_tokens=6)
    torch.testing.assert_close(unfiltered.loss, T(-1.78 / 6))
    # gradient: d(-A r)/dl = -A r on kept unclipped tokens, / N; filtered tokens get exactly 0
    out.loss.backward()
    torch.testing.assert_close(logprobs.grad, T([[-1.1, 0, 0.9, 0], [0, -0.6, 0, 0]]) / 6)


def test_shaper_output_through_the_loss():
    # The shaper's loss mask as pg_mask, N = the response tokens: at ratio 1 the loss is
    # -sum_kept A' / N = -(2 * 0.91437371 - 0.59281314 + 1.8) / 7.
    result = VPPOShaper(VPPOConfig()).shape(_inputs(HAND_AUG, HAND_OLD, HAND_MASK, HAND_A, HAND_G))
    out = dapo_policy_loss(HAND_OLD.clone(), HAND_OLD, result.advantages, HAND_MASK, global_num_tokens=7,
                           pg_mask=result.loss_mask)
    torch.testing.assert_close(out.loss, T(-(2 * 0.91437371 - 0.59281314 + 1.8) / 7))


# ------------------------------------------------------------------------------- entropy penalty


def test_entropy_penalty_value_and_gradient_by_hand():
    # c_H = 0.06; response log-probs [-0.5, -1.0] and [-2.0]: H_s token sum = 0.5 + 1 + 2 = 3.5
    # term = 0.06 * 3.5 = 0.21; d term / d l_t = -0.06 on every response token (filter NOT applied), 0 off
    (term,) = VPPOShaper(VPPOConfig(entropy_coef=0.06)).loss_terms()
    assert isinstance(term, SampleEntropyPenalty) and term.statistics() == ()
    nan = float("nan")
    logprobs = T([[-0.5, -1.0, nan], [nan, -2.0, 7.0]]).requires_grad_()
    mask = T([[1, 1, 0], [0, 1, 0]], dtype=B_)
    total, metrics = term.loss_sum(LossInputs(logprobs, None, mask, {}, step=0, total_steps=1))
    assert total.dim() == 0
    torch.testing.assert_close(total, T(0.21))
    torch.testing.assert_close(metrics["sample_entropy"], T(3.5))
    assert not metrics["sample_entropy"].requires_grad
    total.backward()
    torch.testing.assert_close(logprobs.grad, T([[-0.06, -0.06, 0.0], [0.0, -0.06, 0.0]]))


def test_entropy_penalty_gradient_matches_autograd_of_the_formula():
    g = torch.Generator().manual_seed(0)
    l = -torch.rand(3, 6, generator=g) * 3
    mask = torch.rand(3, 6, generator=g) > 0.3
    coef = 0.11
    x = l.clone().requires_grad_()
    (coef * -(x * mask).sum()).backward()  # the hand formula: c_H * sum over response tokens of -l_t
    y = l.clone().requires_grad_()
    total, _ = SampleEntropyPenalty(coef).loss_sum(LossInputs(y, None, mask, {}, 0, 1))
    total.backward()
    torch.testing.assert_close(total, coef * -(l * mask).sum())
    torch.testing.assert_close(y.grad, x.grad)


def test_entropy_penalty_comes_only_with_a_positive_coefficient():
    assert VPPOShaper(VPPOConfig(entropy_coef=0.0)).loss_terms() == ()
    assert len(VPPOShaper(VPPOConfig()).loss_terms()) == 1


# ------------------------------------------------------------------ loop reference, straight from the spec


def _reference(l_aug, l_old, mask, outcome, group_ids, cfg, minibatches=(), micro_batch_size=1):
    """METHODS_SPEC section 2, one row and one token at a time (no package function is called)."""
    B, L = mask.shape
    D = [[0.0] * L for _ in range(B)]
    keep = [[False] * L for _ in range(B)]
    S = [0.0] * B
    for i in range(B):
        toks = [t for t in range(L) if mask[i, t]]
        for t in toks:
            d = min(max(float(l_aug[i, t]) - float(l_old[i, t]), -20.0), 20.0)
            D[i][t] = min(max(math.exp(d) - d - 1.0, 0.0), 10.0)
        k = math.ceil(Fraction(str(cfg.token_fraction)) * len(toks))  # exact decimal: 0.4 * 5 = 2
        for t in sorted(toks, key=lambda t: (-D[i][t], t))[:k]:  # largest D first, then the earlier token
            keep[i][t] = True
        S[i] = sum(D[i][t] for t in toks) / max(len(toks), 1)

    if cfg.scope == "batch":
        norm_scopes = mu_scopes = [list(range(B))]
    elif cfg.scope == "group":
        norm_scopes = mu_scopes = [[i for i in range(B) if group_ids[i] == g] for g in sorted(set(group_ids.tolist()))]
    else:
        norm_scopes = [list(rows) for rows in minibatches]
        mu_scopes = [list(rows[j:j + micro_batch_size]) for rows in minibatches
                     for j in range(0, len(rows), micro_batch_size)]
    s_tilde, degenerate = [0.0] * B, [False] * B
    for rows in norm_scopes:
        lo, hi = min(S[i] for i in rows), max(S[i] for i in rows)
        for i in rows:
            if len(rows) < 2 or hi - lo <= 1e-6:
                degenerate[i] = True
            else:
                s_tilde[i] = min(max((S[i] - lo) / (hi - lo), 0.0), 1.0)
    alpha = [1.0] * B
    for rows in mu_scopes:
        mu = sum(s_tilde[i] for i in rows) / len(rows)
        for i in rows:
            if not degenerate[i]:
                alpha[i] = cfg.b_min + (1 - cfg.b_min) * s_tilde[i] / (mu + 1e-8)
    adv = torch.zeros(B, L, dtype=torch.float64)
    for i in range(B):
        for t in range(L):
            if mask[i, t]:
                adv[i, t] = alpha[i] * float(outcome[i])
    return adv, torch.tensor(keep), torch.tensor(alpha, dtype=torch.float64)


def _random_batch(seed, B=9, L=14, group_size=3):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, L, dtype=B_)
    for i in range(B):
        start = int(torch.randint(0, 3, (1,), generator=g))
        n = int(torch.randint(1, L - start + 1, (1,), generator=g))
        mask[i, start:start + n] = True
    l_old = -torch.rand(B, L, generator=g) * 4
    # l_aug: equal to l_old on ~1/3 of the tokens (D = 0 ties), far below on a few (D = 10 ties)
    shift = torch.randn(B, L, generator=g) * 1.5
    shift[torch.rand(B, L, generator=g) < 0.33] = 0.0
    shift[torch.rand(B, L, generator=g) < 0.1] = -25.0
    l_aug = l_old + shift
    nan = torch.full_like(l_old, float("nan"))
    l_old, l_aug = torch.where(mask, l_old, nan), torch.where(mask, l_aug, -nan)  # garbage off the response
    outcome = torch.randn(B, generator=g)
    group_ids = torch.arange(B) // group_size * 10 + 3
    return l_aug, l_old, mask, outcome, group_ids


REF_CASES = [
    (VPPOConfig(), (), 1),
    (VPPOConfig(scope="group", b_min=0.5, token_fraction=0.5), (), 1),
    (VPPOConfig(scope="official"), [[0, 1, 2, 3, 4, 5], [6, 7, 8]], 2),
    (VPPOConfig(scope="official", b_min=0.0, token_fraction=1.0), [[4, 0, 8, 1], [2, 3, 5, 6, 7]], 3),
]


@pytest.mark.parametrize("cfg,minibatches,mbs", REF_CASES, ids=["batch", "group", "official", "official-b0"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(cfg, minibatches, mbs, seed):
    l_aug, l_old, mask, outcome, gid = _random_batch(seed)
    result = VPPOShaper(cfg).shape(_inputs(l_aug, l_old, mask, outcome, gid, minibatches=minibatches,
                                           micro_batch_size=mbs, cfg=cfg))
    ref_adv, ref_keep, _ = _reference(l_aug, l_old, mask, outcome, gid, cfg, minibatches, mbs)
    torch.testing.assert_close(result.advantages.double(), ref_adv, atol=1e-5, rtol=1e-5)
    assert torch.equal(result.loss_mask, ref_keep)


# ------------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("scope", ["batch", "group", "official"])
def test_padding_changes_nothing(scope):
    l_aug, l_old, mask, outcome, gid = _random_batch(3)
    cfg = VPPOConfig(scope=scope)
    mb = [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    base = VPPOShaper(cfg).shape(_inputs(l_aug, l_old, mask, outcome, gid, minibatches=mb, micro_batch_size=2,
                                         cfg=cfg))
    pad = 5
    garbage = 1e3 * torch.randn(len(outcome), pad)
    wide = [torch.cat([x, garbage], dim=1) for x in (l_aug, l_old)]
    mask2 = torch.cat([mask, torch.zeros(len(outcome), pad, dtype=B_)], dim=1)
    padded = VPPOShaper(cfg).shape(_inputs(*wide, mask2, outcome, gid, minibatches=mb, micro_batch_size=2, cfg=cfg))
    assert torch.equal(padded.advantages[:, :-pad], base.advantages)
    assert torch.equal(padded.loss_mask[:, :-pad], base.loss_mask)
    assert not padded.advantages[:, -pad:].any() and not padded.loss_mask[:, -pad:].any()


@pytest.mark.parametrize("scope", ["batch", "group"])
def test_row_permutation_permutes_outputs(scope):
    l_aug, l_old, mask, outcome, gid = _random_batch(4)
    cfg = VPPOConfig(scope=scope)
    base = VPPOShaper(cfg).shape(_inputs(l_aug, l_old, mask, outcome, gid, cfg=cfg))
    perm = torch.randperm(len(outcome), generator=torch.Generator().manual_seed(1))
    permuted = VPPOShaper(cfg).shape(_inputs(l_aug[perm], l_old[perm], mask[perm], outcome[perm], gid[perm], cfg=cfg))
    torch.testing.assert_close(permuted.advantages, base.advantages[perm], atol=1e-7, rtol=0)
    assert torch.equal(permuted.loss_mask, base.loss_mask[perm])
    assert permuted.metrics.reduce() == pytest.approx(base.metrics.reduce())


@pytest.mark.parametrize("scope", ["batch", "group", "official"])
def test_zero_advantage_stays_zero_and_off_response_is_zero(scope):
    l_aug, l_old, mask, outcome, gid = _random_batch(5)
    outcome[::2] = 0.0
    cfg = VPPOConfig(scope=scope)
    result = VPPOShaper(cfg).shape(_inputs(l_aug, l_old, mask, outcome, gid, minibatches=[list(range(9))], cfg=cfg))
    assert (result.advantages[::2] == 0).all()
    assert (result.advantages[~mask] == 0).all() and not result.loss_mask[~mask].any()
    assert torch.isfinite(result.advantages).all()


def test_advantage_sign_is_kept():
    # alpha >= b_min >= 0: the scale never flips an advantage.
    l_aug, l_old, mask, outcome, gid = _random_batch(6)
    result = VPPOShaper(VPPOConfig(b_min=0.0)).shape(_inputs(l_aug, l_old, mask, outcome, gid))
    a = outcome.unsqueeze(-1).expand_as(mask)[mask]
    assert ((result.advantages[mask] * a) >= 0).all()


def test_config_validation_names_the_field():
    for kwargs, name in [({"token_fraction": 0.0}, "token_fraction"), ({"b_min": 1.5}, "b_min"),
                         ({"mask_prob": -0.1}, "mask_prob"), ({"entropy_coef": -1.0}, "entropy_coef"),
                         ({"scope": "rank"}, "scope")]:
        with pytest.raises(ValueError, match=name):
            VPPOConfig(**kwargs)


def test_declared_view_is_mask_patches_after_resize_per_row():
    (stat,) = VPPOShaper(VPPOConfig()).statistics()
    v = stat.view
    assert (v.kind, v.p, v.cell, v.placement, v.per) == ("mask_patches", 0.5, 14, "resized", "row")


# ------------------------------------------------------------------ batch scope over data-parallel ranks


@pytest.mark.distributed
def test_batch_scope_reduced_over_dp_ranks_equals_single_process(tmp_path):
    g = torch.Generator().manual_seed(0)
    S = torch.rand(10, generator=g, dtype=torch.float64) * 3
    gid = torch.arange(10) // 2
    # rank 0 holds groups 0, 2, 4 (its rows in any order), rank 1 groups 1, 3: whole groups, unequal counts
    parts = [[5, 0, 1, 4, 8, 9], [2, 3, 6, 7]]
    torch.save({"S": S, "group_ids": gid, "b_min": 0.9, "parts": parts}, tmp_path / "in.pt")
    run_torchrun(WORKER, 2, "scale", tmp_path / "in.pt", tmp_path)
    for scope in ("batch", "group"):
        whole = trajectory_scale(S, 0.9, scope, gid)
        got = torch.zeros(10)
        for rank, rows in enumerate(parts):
            got[rows] = torch.load(tmp_path / f"scale_rank{rank}.pt")[scope]
        torch.testing.assert_close(got, whole, atol=1e-7, rtol=0)
    # and without the reduction the halves would differ (the test is not vacuous)
    alone = trajectory_scale(S[parts[1]], 0.9, "batch", gid[parts[1]])
    assert not torch.allclose(alone, trajectory_scale(S, 0.9, "batch", gid)[parts[1]])
