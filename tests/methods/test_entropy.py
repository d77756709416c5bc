"""Entropy-based advantage shaping (METHODS_SPEC section 1): hand-computed values, a per-token loop
reference written from the spec, properties and config validation."""

import pytest
import torch

from megatron_vgpo.config import ConfigError, load_config
from megatron_vgpo.methods import ShapingInputs
from megatron_vgpo.methods.entropy import EntropyShaper, EntropyShapingConfig, entropy_bonus

T = torch.tensor
B_ = torch.bool


def _inputs(outcome, H, mask, group_ids=None):
    """Shaping inputs as the trainer builds them: the outcome advantage broadcast over the response."""
    B, L = mask.shape
    key = EntropyShaper(EntropyShapingConfig()).entropy.key
    return ShapingInputs(
        advantages=outcome.unsqueeze(-1) * mask, outcome=outcome, response_mask=mask, loss_mask=mask.clone(),
        group_ids=group_ids if group_ids is not None else torch.zeros(B, dtype=torch.long),
        has_image=torch.ones(B, dtype=B_), old_logprobs=torch.zeros(B, L), stats={key: H})


# ------------------------------------------------------------------------------ hand-computed values

# alpha = 0.4, kappa = 2; L = 5, padding (mask False) holds garbage entropy 99.
# Row 0: A = 1, cap |A| / kappa = 0.5; response at positions 1..3 with H = [0.5, 2.0, 1.5]
#   alpha H = [0.2, 0.8, 0.6] -> min(., 0.5) = [0.2, 0.5, 0.5] -> A' = [1.2, 1.5, 1.5]
# Row 1: A = -0.5, cap 0.25; positions 0..1, H = [0.25, 1.0]
#   alpha H = [0.1, 0.4] -> [0.1, 0.25] -> A' = [-0.4, -0.25]
# Row 2: A = 0, cap 0; position 2, H = 3.0 -> alpha H = 1.2 -> bonus 0 -> A' = 0
HAND_H = T([[99.0, 0.5, 2.0, 1.5, 99.0],
            [0.25, 1.0, 99.0, 99.0, 99.0],
            [99.0, 99.0, 3.0, 99.0, 99.0]])
HAND_MASK = T([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0]], dtype=B_)
HAND_A = T([1.0, -0.5, 0.0])


def test_entropy_bonus_by_hand():
    bonus = entropy_bonus(HAND_A.unsqueeze(-1) * HAND_MASK, HAND_H, HAND_MASK, alpha=0.4, kappa=2.0)
    torch.testing.assert_close(bonus, T([[0, 0.2, 0.5, 0.5, 0], [0.1, 0.25, 0, 0, 0], [0, 0, 0, 0, 0.0]]))


def test_shaper_by_hand():
    result = EntropyShaper(EntropyShapingConfig(alpha=0.4, kappa=2.0)).shape(_inputs(HAND_A, HAND_H, HAND_MASK))
    torch.testing.assert_close(result.advantages, T([[0, 1.2, 1.5, 1.5, 0], [-0.4, -0.25, 0, 0, 0], [0, 0, 0, 0, 0.0]]))
    assert torch.equal(result.loss_mask, HAND_MASK)  # the entropy shaper never narrows the loss mask
    m = result.metrics.reduce()
    # token entropy over the 6 response tokens: (0.5 + 2 + 1.5 + 0.25 + 1 + 3) / 6 = 8.25 / 6 = 1.375
    # bonus: (0.2 + 0.5 + 0.5 + 0.1 + 0.25 + 0) / 6 = 1.55 / 6
    # capped (alpha H > |A| / kappa): 0.8 > 0.5, 0.6 > 0.5, 0.4 > 0.25, 1.2 > 0 -> 4 / 6
    assert m["entropy/token_entropy"] == pytest.approx(1.375)
    assert m["entropy/bonus"] == pytest.approx(1.55 / 6)
    assert m["entropy/capped_fraction"] == pytest.approx(4 / 6)


def test_alpha_and_kappa_enter_as_specified():
    # alpha = 1, kappa = 4: row 0 cap 0.25 -> alpha H = [0.5, 2, 1.5] all capped -> A' = 1.25 everywhere.
    result = EntropyShaper(EntropyShapingConfig(alpha=1.0, kappa=4.0)).shape(_inputs(HAND_A, HAND_H, HAND_MASK))
    torch.testing.assert_close(result.advantages[0, 1:4], T([1.25, 1.25, 1.25]))
    # row 1: cap 0.125, alpha H = [0.25, 1.0] -> both capped -> -0.5 + 0.125 = -0.375
    torch.testing.assert_close(result.advantages[1, :2], T([-0.375, -0.375]))
    # alpha = 0: no bonus at all.
    result = EntropyShaper(EntropyShapingConfig(alpha=0.0)).shape(_inputs(HAND_A, HAND_H, HAND_MASK))
    torch.testing.assert_close(result.advantages, HAND_A.unsqueeze(-1) * HAND_MASK)


# ------------------------------------------------------------------ loop reference, straight from the spec


def _reference(outcome, H, mask, alpha, kappa):
    """METHODS_SPEC section 1, one token at a time: A'_{i,t} = A_i + min(alpha H_t, |A_i| / kappa)."""
    B, L = mask.shape
    out = torch.zeros(B, L, dtype=torch.float64)
    for i in range(B):
        a = float(outcome[i])
        for t in range(L):
            if mask[i, t]:
                out[i, t] = a + min(alpha * float(H[i, t]), abs(a) / kappa)
    return out


def _random_batch(seed, B=7, L=13):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, L, dtype=B_)
    for i in range(B):
        start = int(torch.randint(0, 4, (1,), generator=g))
        n = int(torch.randint(1, L - start + 1, (1,), generator=g))
        mask[i, start:start + n] = True
    H = torch.rand(B, L, generator=g) * 4.0  # entropies up to 4 nats: both sides of the cap occur
    H = torch.where(mask, H, torch.full_like(H, float("nan")))  # garbage off the response
    outcome = torch.randn(B, generator=g)
    outcome[1] = 0.0
    return outcome, H, mask


@pytest.mark.parametrize("alpha,kappa", [(0.4, 2.0), (1.0, 1.5), (0.05, 10.0)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_loop_reference(seed, alpha, kappa):
    outcome, H, mask = _random_batch(seed)
    result = EntropyShaper(EntropyShapingConfig(alpha, kappa)).shape(_inputs(outcome, H, mask))
    torch.testing.assert_close(result.advantages.double(), _reference(outcome, H, mask, alpha, kappa),
                               atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------------------------- properties


def test_zero_advantage_stays_zero():
    outcome, H, mask = _random_batch(3)
    outcome[::2] = 0.0
    result = EntropyShaper(EntropyShapingConfig(alpha=5.0)).shape(_inputs(outcome, H, mask))
    assert (result.advantages[::2] == 0).all()


@pytest.mark.parametrize("kappa", [1.0001, 1.5, 2.0, 7.0])
def test_sign_never_flips_for_kappa_above_one(kappa):
    outcome, H, mask = _random_batch(4, B=12)
    H = H * 100  # a huge alpha H: the cap |A| / kappa binds everywhere
    result = EntropyShaper(EntropyShapingConfig(alpha=1.0, kappa=kappa)).shape(_inputs(outcome, H, mask))
    a = outcome.unsqueeze(-1).expand_as(mask)[mask]
    shaped = result.advantages[mask]
    assert (torch.sign(shaped) == torch.sign(a)).all()
    # and the bonus stays in [0, |A| / kappa]
    assert ((shaped - a) >= 0).all() and ((shaped - a) <= a.abs() / kappa + 1e-6).all()


def test_outside_response_is_zero():
    outcome, H, mask = _random_batch(5)
    result = EntropyShaper(EntropyShapingConfig()).shape(_inputs(outcome, H, mask))
    assert (result.advantages[~mask] == 0).all()
    assert torch.isfinite(result.advantages).all()


def test_padding_changes_nothing():
    outcome, H, mask = _random_batch(6, L=10)
    cfg = EntropyShapingConfig()
    base = EntropyShaper(cfg).shape(_inputs(outcome, H, mask))
    pad = 6
    H2 = torch.cat([H, 1e4 * torch.randn(H.shape[0], pad)], dim=1)  # large garbage under the padding
    mask2 = torch.cat([mask, torch.zeros(H.shape[0], pad, dtype=B_)], dim=1)
    padded = EntropyShaper(cfg).shape(_inputs(outcome, H2, mask2))
    assert torch.equal(padded.advantages[:, :10], base.advantages)
    assert (padded.advantages[:, 10:] == 0).all()
    assert padded.metrics.reduce() == pytest.approx(base.metrics.reduce())


def test_row_permutation_permutes_outputs():
    outcome, H, mask = _random_batch(7)
    cfg = EntropyShapingConfig()
    base = EntropyShaper(cfg).shape(_inputs(outcome, H, mask))
    perm = torch.randperm(len(outcome), generator=torch.Generator().manual_seed(0))
    permuted = EntropyShaper(cfg).shape(_inputs(outcome[perm], H[perm], mask[perm]))
    assert torch.equal(permuted.advantages, base.advantages[perm])
    assert permuted.metrics.reduce() == pytest.approx(base.metrics.reduce())


def test_statistic_declared_is_the_original_view_entropy():
    (stat,) = EntropyShaper(EntropyShapingConfig()).statistics()
    assert stat.needs_entropy and not stat.needs_hidden_states
    assert stat.view.kind == "original" and stat.key == "entropy@original"


# ---------------------------------------------------------------------------------- config validation


@pytest.mark.parametrize("kappa", [1.0, 0.5, 0.0, -2.0, float("nan")])
def test_kappa_at_most_one_is_refused_by_name(kappa):
    with pytest.raises(ValueError, match="kappa"):
        EntropyShapingConfig(kappa=kappa)


@pytest.mark.parametrize("alpha", [-0.1, float("nan")])
def test_negative_alpha_is_refused_by_name(alpha):
    with pytest.raises(ValueError, match="alpha"):
        EntropyShapingConfig(alpha=alpha)


def test_config_file_path_names_the_field():
    with pytest.raises(ConfigError, match=r"algorithm\.entropy\.kappa"):
        load_config(None, ["algorithm.entropy.kappa=1.0"])
    cfg = load_config(None, ["algorithm.shapers=[entropy]", "algorithm.entropy.kappa=3", "algorithm.entropy.alpha=0.1"])
    assert cfg.algorithm.entropy == EntropyShapingConfig(alpha=0.1, kappa=3.0)
