"""GRPO / Dr.GRPO outcome advantages: hand-computed cases, a loop reference, and properties."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vgpo.algorithms.advantages import (
    broadcast_to_tokens,
    compute_grpo_outcome_advantages,
    group_ids_to_index,
    group_mean_std,
)

# Group 7 has rewards [1, 0, 1, 1], group 3 has [0, 0]; rows shuffled, not consecutive.
IDS = torch.tensor([7, 3, 7, 3, 7, 7])
REWARDS = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])


def reference_advantages(rewards, group_ids, eps=1e-6, scale_by_std=True):
    """Slow, obvious version: a Python loop over rows and their groups."""
    out = []
    for i in range(len(rewards)):
        members = [float(rewards[j]) for j in range(len(rewards)) if int(group_ids[j]) == int(group_ids[i])]
        mean = sum(members) / len(members)
        var = sum((m - mean) ** 2 for m in members) / (len(members) - 1) if len(members) > 1 else 0.0
        centered = float(rewards[i]) - mean
        out.append(centered / (math.sqrt(var) + eps) if scale_by_std else centered)
    return torch.tensor(out, dtype=torch.float64)


def random_batch(seed: int, batch: int = 200):
    gen = torch.Generator().manual_seed(seed)
    # Sparse, negative and large ids; sizes vary (including singletons); rows shuffled.
    ids = torch.randint(-50, 50, (batch,), generator=gen) * 1_000_003
    rewards = torch.randint(0, 2, (batch,), generator=gen).float()
    rewards += 0.5 * torch.rand(batch, generator=gen) * (torch.rand(batch, generator=gen) < 0.3)
    return rewards, ids


def test_group_ids_to_index_dense_and_consistent():
    inverse, num_groups = group_ids_to_index(torch.tensor([10**12, -4, 10**12, 5, -4]))
    assert num_groups == 3
    assert inverse.dtype == torch.int64
    # Groups are numbered in increasing id order: -4 -> 0, 5 -> 1, 10**12 -> 2.
    assert inverse.tolist() == [2, 0, 2, 1, 0]


def test_group_ids_to_index_rejects_float_ids():
    with pytest.raises(ValueError, match="group_ids"):
        group_ids_to_index(torch.tensor([1.0, 2.0]))


def test_group_mean_std_hand_values():
    mean, std, count = group_mean_std(REWARDS, IDS)
    # Group 7: mean 3/4; squared deviations 3 * (1/4)^2 + (3/4)^2 = 3/4; unbiased var (3/4)/3 = 1/4.
    # Group 3: mean 0, std 0.
    torch.testing.assert_close(mean, torch.tensor([0.75, 0.0, 0.75, 0.0, 0.75, 0.75]))
    torch.testing.assert_close(std, torch.tensor([0.5, 0.0, 0.5, 0.0, 0.5, 0.5]))
    torch.testing.assert_close(count, torch.tensor([4.0, 2.0, 4.0, 2.0, 4.0, 4.0]))


def test_group_of_one_has_zero_std_not_nan():
    mean, std, count = group_mean_std(torch.tensor([0.3, 1.0, 2.0]), torch.tensor([9, 4, 4]))
    # Group 4 = [1, 2]: unbiased var = (0.25 + 0.25) / 1 = 0.5.
    torch.testing.assert_close(std, torch.tensor([0.0, math.sqrt(0.5), math.sqrt(0.5)]))
    torch.testing.assert_close(mean, torch.tensor([0.3, 1.5, 1.5]))
    assert count.tolist() == [1.0, 2.0, 2.0]


def test_grpo_advantages_hand_values():
    adv = compute_grpo_outcome_advantages(REWARDS, IDS, eps=1e-6)
    # Group 7: (1 - 0.75) / (0.5 + 1e-6) = 0.499999000002, (0 - 0.75) / 0.500001 = -1.499997000006.
    # Group 3: (0 - 0) / (0 + 1e-6) = 0.
    expected = torch.tensor([0.499999000002, 0.0, -1.499997000006, 0.0, 0.499999000002, 0.499999000002])
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-7)


def test_dr_grpo_advantages_hand_values():
    adv = compute_grpo_outcome_advantages(REWARDS, IDS, scale_by_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.25, 0.0, -0.75, 0.0, 0.25, 0.25]))


def test_singleton_and_constant_groups_get_exactly_zero():
    # 0.1 is not exact in binary; float64 stats keep rounding error far below eps.
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.7])
    adv = compute_grpo_outcome_advantages(rewards, torch.tensor([2, 2, 2, 8]))
    assert adv.abs().max().item() < 1e-9


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference_on_random_batches(seed, scale_by_std):
    rewards, ids = random_batch(seed)
    adv = compute_grpo_outcome_advantages(rewards.double(), ids, scale_by_std=scale_by_std)
    torch.testing.assert_close(adv, reference_advantages(rewards, ids, scale_by_std=scale_by_std))


def test_row_permutation_permutes_outputs():
    rewards, ids = random_batch(3)
    perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(4))
    adv = compute_grpo_outcome_advantages(rewards, ids)
    torch.testing.assert_close(compute_grpo_outcome_advantages(rewards[perm], ids[perm]), adv[perm])


def test_relabelling_groups_changes_nothing():
    rewards, ids = random_batch(5)
    adv = compute_grpo_outcome_advantages(rewards, ids)
    torch.testing.assert_close(compute_grpo_outcome_advantages(rewards, -3 * ids + 11), adv)


def test_groups_are_not_consecutive_rows():
    # Same multiset of rewards per block of 2 rows, but groups interleave: a "consecutive rows" bug
    # would give [0, 0, 0, 0]; grouping by id gives +-1/sqrt(2) per group of {1, 0}.
    adv = compute_grpo_outcome_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.tensor([1, 2, 1, 2]))
    s = 0.5 / (math.sqrt(0.5) + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([s, s, -s, -s]))


def test_int_and_bool_rewards_are_promoted_and_no_grad():
    adv = compute_grpo_outcome_advantages(REWARDS.bool(), IDS)
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, compute_grpo_outcome_advantages(REWARDS, IDS))
    graded = REWARDS.clone().requires_grad_(True)
    assert not compute_grpo_outcome_advantages(graded, IDS).requires_grad


def test_validation_errors_name_the_argument():
    with pytest.raises(ValueError, match="group_ids has 2 rows"):
        compute_grpo_outcome_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="values must be 1-D"):
        group_mean_std(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="eps"):
        compute_grpo_outcome_advantages(REWARDS, IDS, eps=0.0)


def test_broadcast_to_tokens_hand_values():
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    out = broadcast_to_tokens(torch.tensor([2.0, -1.0]), mask)
    torch.testing.assert_close(out, torch.tensor([[0.0, 2.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="response_mask"):
        broadcast_to_tokens(torch.tensor([2.0, -1.0, 0.0]), mask)
