"""DAPO loss, dynamic sampling and overlong penalty: hand-computed cases, a loop reference, properties."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vgpo.algorithms.dapo import (
    dapo_policy_loss,
    dynamic_sampling_keep,
    finalize_policy_metrics,
    kept_group_ids,
    low_var_kl,
    overlong_penalty,
    sum_metric_sums,
)

# Seven valid tokens in a [2, 4] batch (row 1 ends in padding), logp_old = 0, so ratio = r exactly.
#   token  A    r    per-token loss (eps_low 0.2, eps_high 0.28, c 3)        d loss / d logp (= dl/dr * r)
#   0      1    1.1  inside:         -1.1                                      -1.1
#   1      1    1.5  clipped high:   -1.28                                      0
#   2     -1    0.5  clipped low:    max(0.5, 0.8) = 0.8                        0
#   3     -1    5.0  dual clip:      min(max(5, 1.28), 3) = 3                   0
#   4     -1    1.1  inside:          1.1                                       1.1
#   5      2    0.5  A > 0, r low, not clipped: max(-1, -1.6) = -1             -1.0
#   6     -2    2.0  A < 0, r high, below c: max(4, 2.56) = 4                   4.0
# Sum = -1.1 - 1.28 + 0.8 + 3 + 1.1 - 1 + 4 = 5.52; with N = 7 the loss is 5.52 / 7.
HAND_ADV = torch.tensor([[1.0, 1.0, -1.0, -1.0], [-1.0, 2.0, -2.0, 0.0]])
HAND_RATIO = torch.tensor([[1.1, 1.5, 0.5, 5.0], [1.1, 0.5, 2.0, 1.0]])
HAND_MASK = torch.tensor([[True, True, True, True], [True, True, True, False]])
HAND_GRAD = torch.tensor([[-1.1, 0.0, 0.0, 0.0], [1.1, -1.0, 4.0, 0.0]]) / 7


def hand_inputs():
    logprobs = HAND_RATIO.log().requires_grad_(True)
    return logprobs, torch.zeros_like(logprobs), HAND_ADV, HAND_MASK


def reference_loss(logp, old, adv, mask, n, low=0.2, high=0.28, c=3.0, ref=None, kl_coef=0.0,
                   ent=None, ent_coef=0.0):
    """Slow version: a Python loop over every token, straight from the DAPO equations."""
    total = 0.0
    for i in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[i, t]:
                continue
            a, r = float(adv[i, t]), math.exp(float(logp[i, t] - old[i, t]))
            loss = max(-a * r, -a * min(max(r, 1 - low), 1 + high))
            if a < 0 and c is not None:
                loss = min(loss, -a * c)
            if ref is not None:
                d = float(ref[i, t] - logp[i, t])
                loss += kl_coef * (math.exp(d) - d - 1)
            if ent is not None:
                loss -= ent_coef * float(ent[i, t])
            total += loss
    return total / n


def random_inputs(seed: int, batch: int = 6, length: int = 12):
    gen = torch.Generator().manual_seed(seed)
    old = -3 * torch.rand(batch, length, generator=gen)
    logp = (old + 0.6 * torch.randn(batch, length, generator=gen)).clamp(max=0).requires_grad_(True)
    adv = torch.randn(batch, length, generator=gen)
    mask = torch.rand(batch, length, generator=gen) < 0.8
    ref = old + 0.3 * torch.randn(batch, length, generator=gen)
    ent = torch.rand(batch, length, generator=gen).requires_grad_(True)
    return logp, old, adv, mask, ref, ent


def test_hand_case_loss_and_gradient():
    logp, old, adv, mask = hand_inputs()
    out = dapo_policy_loss(logp, old, adv, mask, global_num_tokens=7)
    torch.testing.assert_close(out.loss, torch.tensor(5.52 / 7))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, HAND_GRAD)


def test_hand_case_metrics():
    logp, old, adv, mask = hand_inputs()
    sums = dapo_policy_loss(logp, old, adv, mask, global_num_tokens=7).metric_sums
    assert float(sums["num_tokens"]) == 7
    # One token each: token 1 (upper clip), token 2 (lower clip), token 3 (dual clip).
    clip_keys = ("pg_clipfrac_higher", "pg_clipfrac_lower", "pg_clipfrac_dual")
    assert [float(sums[k]) for k in clip_keys] == [1, 1, 1]
    means = finalize_policy_metrics(sums)
    assert means["pg_clipfrac_higher"] == pytest.approx(1 / 7)
    assert means["pg_loss"] == pytest.approx(5.52 / 7)
    # ppo_kl = mean(logp_old - logp) = -(ln 1.1 + ln 1.5 + ln 0.5 + ln 5 + ln 1.1 + ln 0.5 + ln 2) / 7.
    assert means["ppo_kl"] == pytest.approx(-1.5123761995909695 / 7, rel=1e-5)
    assert "kl" not in means and "entropy" not in means


def test_dual_clip_disabled():
    logp, old, adv, mask = hand_inputs()
    out = dapo_policy_loss(logp, old, adv, mask, global_num_tokens=7, clip_ratio_c=None)
    # Token 3 now costs max(5, 1.28) = 5 instead of 3, and its gradient -A * r = 5 comes back.
    torch.testing.assert_close(out.loss, torch.tensor(7.52 / 7))
    assert float(out.metric_sums["pg_clipfrac_dual"]) == 0
    out.loss.backward()
    expected = HAND_GRAD.clone()
    expected[0, 3] = 5.0 / 7
    torch.testing.assert_close(logp.grad, expected)


def test_symmetric_clip_changes_upper_bound():
    logp, old, adv, mask = hand_inputs()
    out = dapo_policy_loss(logp, old, adv, mask, 7, clip_ratio_high=0.2)
    # Token 1: -1.2 instead of -1.28; token 6: max(4, 2 * 1.2) = 4 unchanged.
    torch.testing.assert_close(out.loss, torch.tensor((5.52 + 0.08) / 7))


@pytest.mark.parametrize("bad", [1.0, 0.5, -3.0])
def test_clip_ratio_c_must_exceed_one(bad):
    logp, old, adv, mask = hand_inputs()
    with pytest.raises(ValueError, match="clip_ratio_c"):
        dapo_policy_loss(logp, old, adv, mask, 7, clip_ratio_c=bad)


def test_validation_errors_name_the_argument():
    logp, old, adv, mask = hand_inputs()
    with pytest.raises(ValueError, match="advantages has shape"):
        dapo_policy_loss(logp, old, adv[:, :3], mask, 7)
    with pytest.raises(ValueError, match="global_num_tokens"):
        dapo_policy_loss(logp, old, adv, mask, 0)
    with pytest.raises(ValueError, match="clip_ratio_low"):
        dapo_policy_loss(logp, old, adv, mask, 7, clip_ratio_low=1.0)


def test_low_var_kl_hand_values():
    logp = torch.zeros(4)
    ref = torch.tensor([math.log(2), -math.log(2), 0.0, 30.0])
    # exp(d) - d - 1: d = ln 2 -> 1 - ln 2 = 0.30685282; d = -ln 2 -> ln 2 - 0.5 = 0.19314718;
    # d = 0 -> 0; d = 30 -> clamped to 20, exp(20) - 21 is huge -> clamped to 10.
    torch.testing.assert_close(low_var_kl(logp, ref), torch.tensor([0.30685282, 0.19314718, 0.0, 10.0]))


def test_kl_term_and_entropy_bonus_hand_values():
    logp = torch.zeros(1, 3, requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    ref = torch.tensor([[math.log(2), -math.log(2), 7.0]])
    ent = torch.tensor([[0.5, 1.5, 100.0]])
    out = dapo_policy_loss(logp, torch.zeros(1, 3), torch.zeros(1, 3), mask, 2, ref_logprobs=ref,
                           kl_coef=0.1, entropy=ent, entropy_coef=0.01)
    # A = 0 so the pg part is 0; KL sum = 0.30685282 + 0.19314718 = 0.5; entropy sum = 2.
    # loss = (0.1 * 0.5 - 0.01 * 2) / 2 = 0.015.
    torch.testing.assert_close(out.loss, torch.tensor(0.015))
    means = finalize_policy_metrics(out.metric_sums)
    assert means["kl"] == pytest.approx(0.25) and means["entropy"] == pytest.approx(1.0)
    out.loss.backward()
    # d k3 / d logp = 1 - exp(ref - logp): 1 - 2 = -1 and 1 - 0.5 = 0.5, times kl_coef / N = 0.05.
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.05, 0.025, 0.0]]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference_on_random_inputs(seed):
    logp, old, adv, mask, ref, ent = random_inputs(seed)
    kwargs = dict(ref_logprobs=ref, kl_coef=0.05, entropy=ent, entropy_coef=0.01)
    out = dapo_policy_loss(logp, old, adv, mask, 50, **kwargs)
    expected = reference_loss(logp.detach(), old, adv, mask, 50, ref=ref, kl_coef=0.05,
                              ent=ent.detach(), ent_coef=0.01)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_padding_with_garbage_changes_nothing():
    logp, old, adv, mask, ref, ent = random_inputs(3)
    kwargs = dict(ref_logprobs=ref, kl_coef=0.1, entropy=ent, entropy_coef=0.01)
    base = dapo_policy_loss(logp, old, adv, mask, 40, **kwargs)
    base.loss.backward()

    def pad(x, value):  # longer L, garbage in masked positions, also inside the old length
        x = torch.where(mask, x.detach(), torch.full_like(x, value))
        return torch.cat([x, torch.full((x.shape[0], 5), value)], dim=1)

    logp2 = pad(logp, float("nan")).requires_grad_(True)
    ent2 = pad(ent, float("inf")).requires_grad_(True)
    mask2 = torch.cat([mask, torch.zeros(mask.shape[0], 5, dtype=torch.bool)], dim=1)
    out = dapo_policy_loss(logp2, pad(old, -float("inf")), pad(adv, float("nan")), mask2, 40,
                           ref_logprobs=pad(ref, float("nan")), kl_coef=0.1, entropy=ent2, entropy_coef=0.01)
    out.loss.backward()
    torch.testing.assert_close(out.loss, base.loss)
    torch.testing.assert_close(logp2.grad[:, :12], logp.grad)
    assert torch.all(logp2.grad[~mask2] == 0) and torch.all(ent2.grad[~mask2] == 0)
    for key, value in base.metric_sums.items():
        torch.testing.assert_close(out.metric_sums[key], value)


def test_micro_batches_with_global_count_equal_one_batch():
    logp, old, adv, mask, ref, _ = random_inputs(4, batch=7)
    n = int(mask.sum())
    whole = dapo_policy_loss(logp, old, adv, mask, n, ref_logprobs=ref, kl_coef=0.1)
    whole.loss.backward()
    grad_whole = logp.grad.clone()
    logp.grad = None
    # Uneven split (2 rows / 5 rows, different token counts), as gradient accumulation would do it.
    parts = [dapo_policy_loss(logp[s], old[s], adv[s], mask[s], n, ref_logprobs=ref[s], kl_coef=0.1)
             for s in (slice(0, 2), slice(2, 7))]
    total = parts[0].loss + parts[1].loss
    total.backward()
    torch.testing.assert_close(total, whole.loss)
    torch.testing.assert_close(logp.grad, grad_whole)
    merged = finalize_policy_metrics(sum_metric_sums(p.metric_sums for p in parts))
    assert merged == pytest.approx(whole.local_metrics())
    # Averaging per-micro-batch means would NOT give this (the two parts hold different token counts).
    naive = 0.5 * (parts[0].local_metrics()["pg_loss"] + parts[1].local_metrics()["pg_loss"])
    assert naive != pytest.approx(merged["pg_loss"])


def test_row_permutation_changes_nothing():
    logp, old, adv, mask, ref, _ = random_inputs(5)
    perm = torch.randperm(logp.shape[0], generator=torch.Generator().manual_seed(0))
    a = dapo_policy_loss(logp, old, adv, mask, 30, ref_logprobs=ref, kl_coef=0.1)
    b = dapo_policy_loss(logp[perm], old[perm], adv[perm], mask[perm], 30,
                         ref_logprobs=ref[perm], kl_coef=0.1)
    torch.testing.assert_close(a.loss, b.loss)


def test_tensor_global_num_tokens():
    logp, old, adv, mask = hand_inputs()
    out = dapo_policy_loss(logp, old, adv, mask, torch.tensor(14.0))
    torch.testing.assert_close(out.loss, torch.tensor(5.52 / 14))


def test_dynamic_sampling_hand_case():
    ids = torch.tensor([5, 9, 5, 2, 9, 2, 5, 4])
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    # Group 5 = [1, 0, 1]: mixed, kept. Group 9 = [0, 0] and group 2 = [1, 1]: zero spread, dropped.
    # Group 4 = [1]: a single row has zero spread, dropped.
    keep = dynamic_sampling_keep(rewards, ids)
    assert keep.tolist() == [True, False, True, False, False, False, True, False]
    assert kept_group_ids(ids, keep).tolist() == [5]


def test_dynamic_sampling_continuous_rewards_and_reference():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30, (120,), generator=gen) * 7 - 50
    rewards = torch.randint(0, 2, (120,), generator=gen).float() * (torch.rand(120, generator=gen) < 0.5)
    keep = dynamic_sampling_keep(rewards, ids)
    expected = [len({float(rewards[j]) for j in range(120) if ids[j] == ids[i]}) > 1
                for i in range(120)]
    assert keep.tolist() == expected
    assert 0 < int(keep.sum()) < 120  # the random case exercises both outcomes
    # A tiny spread is still a spread (no std tolerance).
    tiny = dynamic_sampling_keep(torch.tensor([0.5, 0.5 + 1e-6]), torch.tensor([1, 1]))
    assert tiny.tolist() == [True, True]


def test_overlong_penalty_boundaries():
    lengths = torch.tensor([0, 15, 16, 17, 18, 19, 20, 21, 100])
    # L_max = 20, L_cache = 4: free up to 16, then -(len - 16) / 4, -1 from 20 on.
    expected = torch.tensor([0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4), expected)
    torch.testing.assert_close(overlong_penalty(lengths, 20, 4, penalty_factor=0.5), expected * 0.5)
    # buffer = L_max: the ramp starts at 0.
    ramp = overlong_penalty(torch.tensor([0, 5, 10]), 10, 10)
    torch.testing.assert_close(ramp, torch.tensor([0.0, -0.5, -1.0]))


def test_overlong_penalty_validation():
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(torch.tensor([1]), 10, 11)
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(torch.tensor([1]), 10, 0)
    with pytest.raises(ValueError, match="penalty_factor"):
        overlong_penalty(torch.tensor([1]), 10, 2, penalty_factor=-1.0)
