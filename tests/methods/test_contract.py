"""The plug-in contract, for every registered component: shapers (shapes, zero off-response, loss mask
within the response, permutation equivariance, finite), loss terms (finite 0-d sums with a gradient
w.r.t. the current log-probs), image views (deterministic per seed, shape-preserving), the diffusion
schedule, and ``build_methods`` (unknown names, companion terms, view de-duplication, migration)."""

import math
from dataclasses import replace

import pytest
import torch
from PIL import Image

from megatron_vgpo.config import ConfigError, load_config
from megatron_vgpo.config.schema import AlgorithmConfig
from megatron_vgpo.methods import (
    LOSS_TERMS,
    SHAPERS,
    LossInputs,
    LossTerm,
    Methods,
    ShapingInputs,
    build_methods,
)
from megatron_vgpo.methods.base import ViewLogProbs
from megatron_vgpo.methods.diagnostics import FOCUS
from megatron_vgpo.methods.entropy import EntropyShaper, TokenEntropy
from megatron_vgpo.methods.papo import PAPOConfig, PAPOLoss
from megatron_vgpo.methods.vgpo import VGPOConfig
from megatron_vgpo.methods.views import (
    DIFFUSION_STEPS,
    ORIGINAL,
    ImageView,
    diffusion_alpha_bar,
    mask_patches,
    perturbed_images,
    view_generator,
    view_row_images,
)
from megatron_vgpo.methods.vppo import SampleEntropyPenalty, VPPOConfig, VPPOShaper
from megatron_vgpo.models.qwen2_5_vl.pixels import PixelSpec, to_uint8

B_ = torch.bool
GARBAGE = (float("nan"), float("inf"), -float("inf"), 1e6, -1e6)


# ---------------------------------------------------------------------------------------- batches


def _masks(g, B=6, L=12):
    """Response masks: a prompt of 0-2 tokens, then 1+ response tokens, then right padding."""
    mask = torch.zeros(B, L, dtype=B_)
    for i in range(B):
        start = int(torch.randint(0, 3, (1,), generator=g))
        n = int(torch.randint(1, L - start - 1, (1,), generator=g))
        mask[i, start:start + n] = True
    return mask


def _with_garbage(values, mask, g):
    pick = torch.randint(0, len(GARBAGE), values.shape, generator=g)
    garbage = torch.tensor(GARBAGE)[pick]
    return torch.where(mask, values, garbage)


def _stat_values(stat, mask, g):
    """Plausible values of a declared statistic on the response (log-probs <= 0, scores in [0, 1],
    entropies in [0, 3]), garbage elsewhere."""
    B, L = mask.shape
    if isinstance(stat, ViewLogProbs):
        values = -torch.rand(B, L, generator=g) * 4
    elif isinstance(stat, TokenEntropy):
        values = torch.rand(B, L, generator=g) * 3
    else:
        values = torch.rand(B, L, generator=g)
    return _with_garbage(values, mask, g)


def _shaping_inputs(shapers, seed=0, B=6, L=12, group_size=3):
    g = torch.Generator().manual_seed(seed)
    mask = _masks(g, B, L)
    outcome = torch.randn(B, generator=g)
    stats = {}
    for shaper in shapers:
        for stat in shaper.statistics():
            stats.setdefault(stat.key, _stat_values(stat, mask, g))
    has_image = torch.ones(B, dtype=B_)
    has_image[1] = False
    return ShapingInputs(
        advantages=torch.where(mask, outcome.unsqueeze(-1).expand(B, L), torch.zeros(())), outcome=outcome,
        response_mask=mask, loss_mask=mask.clone(), group_ids=torch.arange(B) // group_size * 5 + 2,
        has_image=has_image, old_logprobs=_with_garbage(-torch.rand(B, L, generator=g) * 4, mask, g), stats=stats)


def _permute(inputs, perm):
    return replace(inputs, advantages=inputs.advantages[perm], outcome=inputs.outcome[perm],
                   response_mask=inputs.response_mask[perm], loss_mask=inputs.loss_mask[perm],
                   group_ids=inputs.group_ids[perm], has_image=inputs.has_image[perm],
                   old_logprobs=inputs.old_logprobs[perm], stats={k: v[perm] for k, v in inputs.stats.items()})


def _default_shapers():
    return [SHAPERS[name].from_config(AlgorithmConfig()) for name in sorted(SHAPERS)]


# Scope-independent variants on top of the defaults (VPPO's ``official`` scope depends on row order by
# design: see test_vppo.py).
EXTRA_SHAPERS = [
    ("vppo-group", lambda: VPPOShaper(VPPOConfig(scope="group"))),
    ("vgpo-official", lambda: SHAPERS["vgpo"](VGPOConfig(variant="official"))),
    ("entropy-strong", lambda: EntropyShaper(replace(AlgorithmConfig().entropy, alpha=2.0))),
]
SHAPER_CASES = [(name, (lambda n=name: SHAPERS[n].from_config(AlgorithmConfig()))) for name in sorted(SHAPERS)]
SHAPER_CASES += EXTRA_SHAPERS


def test_registries_hold_the_documented_methods():
    assert set(SHAPERS) == {"vgpo", "entropy", "vppo", "srpo"}
    assert set(LOSS_TERMS) == {"papo"}
    for name, cls in {**SHAPERS, **LOSS_TERMS}.items():
        assert cls.name == name


# ------------------------------------------------------------------------------------------ shapers


@pytest.mark.parametrize("name,make", SHAPER_CASES, ids=[c[0] for c in SHAPER_CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_shaper_contract(name, make, seed):
    shaper = make()
    inputs = _shaping_inputs([shaper], seed)
    B, L = inputs.response_mask.shape
    result = shaper.shape(inputs)
    mask = inputs.response_mask
    assert result.advantages.shape == (B, L) and result.advantages.dtype == torch.float32
    assert result.loss_mask.shape == (B, L) and result.loss_mask.dtype == torch.bool
    assert torch.isfinite(result.advantages).all()
    assert (result.advantages[~mask] == 0).all()
    assert not (result.loss_mask & ~inputs.loss_mask).any()  # only ever narrows, never leaves the response
    assert result.loss_mask.any(-1).all()  # every response keeps a token
    metrics = result.metrics.reduce()
    assert metrics and all(k.startswith(f"{shaper.name}/") for k in metrics)
    assert all(math.isfinite(v) for v in metrics.values()), metrics

    perm = torch.randperm(B, generator=torch.Generator().manual_seed(seed + 10))
    permuted = shaper.shape(_permute(inputs, perm))
    torch.testing.assert_close(permuted.advantages, result.advantages[perm], atol=1e-6, rtol=0)
    assert torch.equal(permuted.loss_mask, result.loss_mask[perm])
    assert permuted.metrics.reduce() == pytest.approx(metrics, abs=1e-6)


def test_shapers_compose_in_order():
    # All of them at once, each on the previous one's output: still finite, zero off-response, narrowed.
    methods = build_methods(AlgorithmConfig(shapers=["entropy", "vppo", "vgpo"]))
    inputs = _shaping_inputs(methods.shapers, seed=3)
    result = methods.shape(inputs)
    assert torch.isfinite(result.advantages).all() and (result.advantages[~inputs.response_mask] == 0).all()
    assert not (result.loss_mask & ~inputs.response_mask).any()
    # the shapers' diagnostics, plus the focus diagnostics logged under every method
    assert {k.split("/")[0] for k in result.metrics.reduce()} == {"entropy", "vppo", "vgpo", "focus"}


def test_no_shaper_is_plain_dapo():
    methods = build_methods(AlgorithmConfig(shapers=[], loss_terms=[]))
    # the only statistic: the focus score of the diagnostics, in the pass over the original images
    assert methods.views() == [ORIGINAL] and methods.statistics(ORIGINAL) == [FOCUS] and methods.loss_terms == []
    inputs = _shaping_inputs([], seed=0)
    g = torch.Generator().manual_seed(1)
    inputs.stats = {FOCUS.key: _stat_values(FOCUS, inputs.response_mask, g)}
    result = methods.shape(inputs)
    assert result.advantages is inputs.advantages and result.loss_mask is inputs.loss_mask
    assert set(result.metrics.reduce()) == {"focus/rho_mean", "focus/late_early_ratio"}


# --------------------------------------------------------------------------------------- loss terms


def _loss_term_cases():
    cases = [(name, cls.from_config(AlgorithmConfig())) for name, cls in sorted(LOSS_TERMS.items())]
    for shaper in _default_shapers():  # terms that come with a shaper (VPPO's entropy penalty)
        cases += [(f"{shaper.name}:{type(t).__name__}", t) for t in shaper.loss_terms()]
    cases.append(("papo-annealed", PAPOLoss(PAPOConfig(anneal_fraction=0.5))))
    return cases


LOSS_CASES = _loss_term_cases()


def test_vppo_penalty_is_among_the_terms_checked():
    assert any(isinstance(t, SampleEntropyPenalty) for _, t in LOSS_CASES)


@pytest.mark.parametrize("name,term", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_loss_term_contract(name, term):
    g = torch.Generator().manual_seed(4)
    mask = _masks(g, B=5, L=10)
    logprobs = _with_garbage(-torch.rand(5, 10, generator=g) * 4, mask, g).requires_grad_()
    entropy = _with_garbage(torch.rand(5, 10, generator=g) * 3, mask, g) if term.needs_entropy else None
    stats = {s.key: _stat_values(s, mask, g) for s in term.statistics()}
    total, metrics = term.loss_sum(LossInputs(logprobs, entropy, mask, stats, step=3, total_steps=10))
    assert total.dim() == 0 and torch.isfinite(total) and total.requires_grad
    total.backward()
    grad = logprobs.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()
    for key, value in metrics.items():
        assert value.dim() == 0 and torch.isfinite(value) and not value.requires_grad, key


# -------------------------------------------------------------------------------------------- views


class _Example:
    """A prompt with one image: ``raw`` as decoded, resized (bicubic) to ``size`` = (W, H) for the model."""

    def __init__(self, raw: Image.Image, size: tuple[int, int], row_id: str = "p0"):
        self.raw, self.size, self.row_id, self.num_images = raw, size, row_id, 1
        self.image_grid_thw = torch.tensor([[1, size[1] // 14, size[0] // 14]])

    def load_images(self, raw: bool = False):
        return [self.raw if raw else self.raw.resize(self.size, Image.Resampling.BICUBIC)]


def _example(seed=0, row_id="p0"):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(1, 256, (37, 50, 3), generator=g, dtype=torch.uint8)  # no 0: a mask is visible
    return _Example(Image.fromarray(pixels.numpy()), (56, 28), row_id)


VIEWS = [
    ORIGINAL,
    ImageView("mask_patches", p=0.5, placement="resized", per="row"),
    ImageView("mask_patches", p=0.5, placement="resized", per="prompt"),
    ImageView("mask_patches", p=0.6, placement="raw", per="prompt"),
    ImageView("mask_patches", p=0.6, placement="raw", per="row"),
    ImageView("gaussian_noise", noise_step=0),
    ImageView("gaussian_noise", noise_step=499),
    ImageView("gaussian_noise", noise_step=999),
]
SPEC = PixelSpec()


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.key)
def test_view_deterministic_per_seed_and_shape_preserving(view):
    ex = _example()
    (a,) = perturbed_images(view, ex, SPEC, seed=1, step=2, key="p0/row3")
    (b,) = perturbed_images(view, ex, SPEC, seed=1, step=2, key="p0/row3")
    assert torch.equal(a, b)
    assert a.shape == (3, 28, 56) and a.dtype == torch.uint8
    others = [perturbed_images(view, ex, SPEC, seed=2, step=2, key="p0/row3")[0],
              perturbed_images(view, ex, SPEC, seed=1, step=3, key="p0/row3")[0],
              perturbed_images(view, ex, SPEC, seed=1, step=2, key="p0/row4")[0]]
    original = to_uint8(ex.load_images()[0])
    if view.kind == "original":
        assert torch.equal(a, original) and all(torch.equal(o, original) for o in others)
    else:
        assert not torch.equal(a, original)
        assert all(not torch.equal(o, a) for o in others)  # another seed, step or key: another draw


@pytest.mark.parametrize("placement", ["resized", "raw"])
def test_mask_patches_p0_unchanged_and_p1_black(placement):
    ex = _example(1)
    (kept,) = perturbed_images(ImageView("mask_patches", p=0.0, placement=placement), ex, SPEC, 0, 0, "k")
    assert torch.equal(kept, to_uint8(ex.load_images()[0]))
    (black,) = perturbed_images(ImageView("mask_patches", p=1.0, placement=placement), ex, SPEC, 0, 0, "k")
    assert black.shape == (3, 28, 56) and not black.any()


def test_mask_patches_cells_from_the_top_left_edges_truncated():
    # 30 x 20 image, cell 14: ceil(30/14) x ceil(20/14) = 3 x 2 cells, the last row of cells 2 px tall and
    # the last column 6 px wide; each cell all kept or all 0 over its 3 channels; with this seed both occur.
    image = torch.randint(1, 256, (3, 30, 20), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out = mask_patches(image, 0.5, 14, view_generator(5, 0, "x"))
    zero = out == 0
    cells = [(slice(r, r + 14), slice(c, c + 14)) for r in (0, 14, 28) for c in (0, 14)]
    states = []
    for rs, cs in cells:
        block = zero[:, rs, cs]
        assert block.all() or not block.any()
        states.append(bool(block.all()))
        if not block.any():
            assert torch.equal(out[:, rs, cs], image[:, rs, cs])
    assert any(states) and not all(states)
    # the fraction of blackened cells follows p
    big = torch.ones(3, 14 * 60, 14 * 60, dtype=torch.uint8)
    for p in (0.2, 0.6):
        frac = 1 - mask_patches(big, p, 14, view_generator(0, 0, f"p{p}"))[0, ::14, ::14].float().mean()
        assert abs(float(frac) - p) < 0.05


def test_per_prompt_views_share_a_perturbation_per_row_views_do_not():
    a, b = _example(0, "pA"), _example(1, "pB")
    prompts, rows = [a, a, b], [0, 1, 2]  # rows 0 and 1: two responses of prompt A
    for view, shared in [(ImageView("mask_patches", p=0.6, placement="raw", per="prompt"), True),
                         (ImageView("mask_patches", p=0.5, placement="resized", per="row"), False)]:
        images = view_row_images(view, prompts, rows, SPEC, seed=0, step=1, load_pixels=True)
        px = [images.pixels[s] for slots in images.row_slots for s in slots]
        assert (images.row_slots[0] == images.row_slots[1]) == shared
        assert torch.equal(px[0], px[1]) == shared
        assert images.grid_thw[images.row_slots[2][0]].tolist() == [1, 2, 4]  # the size is unchanged


def test_view_validation_and_keys():
    for kwargs in [{"kind": "blur"}, {"kind": "mask_patches", "p": 1.5}, {"kind": "mask_patches", "cell": 0},
                   {"kind": "gaussian_noise", "noise_step": DIFFUSION_STEPS}]:
        with pytest.raises(ValueError):
            ImageView(**kwargs)
    assert len({v.key for v in VIEWS}) == len(VIEWS)


def _alpha_bar_loop(t):
    """METHODS_SPEC section 0: beta_j = sigmoid(linspace(-6, 6, 1000))_j (5e-3 - 1e-5) + 1e-5,
    abar_t = prod_{j <= t} (1 - beta_j)."""
    prod = 1.0
    for j in range(t + 1):
        x = -6.0 + 12.0 * j / 999
        beta = 1.0 / (1.0 + math.exp(-x)) * (5e-3 - 1e-5) + 1e-5
        prod *= 1.0 - beta
    return prod


@pytest.mark.parametrize("t", [0, 1, 499, 999])
def test_diffusion_alpha_bar_against_the_formula(t):
    abar = diffusion_alpha_bar()
    assert abar.shape == (DIFFUSION_STEPS,) and abar.dtype == torch.float64
    assert float(abar[t]) == pytest.approx(_alpha_bar_loop(t), rel=1e-12)


def test_diffusion_alpha_bar_by_hand_at_zero():
    # beta_0 = sigmoid(-6) * 4.99e-3 + 1e-5 = 0.0024726232 * 4.99e-3 + 1e-5 = 2.2338390e-5; abar_0 = 1 - beta_0
    assert float(diffusion_alpha_bar()[0]) == pytest.approx(1 - 2.2338390e-5, abs=1e-11)
    assert (diffusion_alpha_bar().diff() < 0).all()


def test_gaussian_noise_follows_the_formula():
    # x~ = clamp(sqrt(abar_t) x + sqrt(1 - abar_t) eps, 0, 1) with eps ~ N(0, 1) from the view's generator,
    # stored as uint8 (rounded).
    ex, t = _example(2), 300
    (got,) = perturbed_images(ImageView("gaussian_noise", noise_step=t), ex, SPEC, seed=4, step=5, key="k")
    x = to_uint8(ex.load_images()[0]).double() / 255
    eps = torch.randn(x.shape, generator=view_generator(4, 5, "k"), dtype=torch.float64)
    abar = _alpha_bar_loop(t)
    expected = ((math.sqrt(abar) * x + math.sqrt(1 - abar) * eps).clamp(0, 1) * 255).round().to(torch.uint8)
    assert torch.equal(got, expected)


# ------------------------------------------------------------------------------------ build_methods


@pytest.mark.parametrize("field,kwargs", [("algorithm.shapers", {"shapers": ["vgpo", "nope"]}),
                                          ("algorithm.loss_terms", {"loss_terms": ["nope"]})])
def test_unknown_names_are_refused_naming_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field.replace(".", r"\.") + r".*nope"):
        build_methods(AlgorithmConfig(**kwargs))
    key = field + "=[nope]"
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [key])


def test_a_method_listed_twice_is_refused():
    with pytest.raises(ValueError, match=r"algorithm\.shapers.*twice"):
        build_methods(AlgorithmConfig(shapers=["vppo", "vppo"]))


def test_vppo_brings_its_entropy_penalty():
    methods = build_methods(AlgorithmConfig(shapers=["vppo"]))
    (term,) = methods.loss_terms
    assert isinstance(term, SampleEntropyPenalty) and term.coef == pytest.approx(0.06)
    methods = build_methods(AlgorithmConfig(shapers=["vppo"], vppo=VPPOConfig(entropy_coef=0.0)))
    assert methods.loss_terms == []
    methods = build_methods(AlgorithmConfig(shapers=["vppo"], loss_terms=["papo"]))
    assert sorted(type(t).__name__ for t in methods.loss_terms) == ["PAPOLoss", "SampleEntropyPenalty"]


class _StubTerm(LossTerm):
    """A loss term declaring the statistic of another method (the same key) to test sharing."""

    name = "stub"

    def __init__(self, stats):
        self.stats = stats

    def statistics(self):
        return self.stats

    def loss_sum(self, inputs):  # pragma: no cover - never called here
        raise NotImplementedError


def test_views_deduplicated():
    # VGPO and the entropy shaper both read the original view: one pass (the original, always first);
    # VGPO's paper-form focus score is the diagnostics' one: computed once.
    methods = build_methods(AlgorithmConfig(shapers=["vgpo", "entropy"]))
    assert methods.views() == [ORIGINAL]
    assert sorted(s.key for s in methods.statistics(ORIGINAL)) == sorted([FOCUS.key, "entropy@original"])
    official = build_methods(AlgorithmConfig(shapers=["vgpo"], vgpo=VGPOConfig(variant="official")))
    assert len(official.statistics(ORIGINAL)) == 2  # the official form is another statistic
    # VPPO and PAPO use different views (resized per row vs raw per prompt): three passes.
    methods = build_methods(AlgorithmConfig(shapers=["vppo"], loss_terms=["papo"]))
    views = methods.views()
    assert views == [ORIGINAL, VPPOConfig().view, PAPOConfig().view] and len(set(views)) == 3
    assert methods.loss_statistic_keys() == [PAPOLoss(PAPOConfig()).aug.key]
    # Two methods declaring the same statistic on the same view: one pass, one statistic.
    vppo = VPPOShaper(VPPOConfig())
    methods = Methods([vppo], [_StubTerm((ViewLogProbs(VPPOConfig().view),))])
    assert methods.views() == [ORIGINAL, VPPOConfig().view]
    assert len(methods.statistics(VPPOConfig().view)) == 1
    # Two statistics on the same view share its pass.
    methods = Methods([vppo], [_StubTerm((TokenEntropy(), ViewLogProbs(VPPOConfig().view)))])
    assert methods.views() == [ORIGINAL, VPPOConfig().view]
    assert sorted(s.key for s in methods.statistics(ORIGINAL)) == sorted(["entropy@original", FOCUS.key])


def test_current_shapers_need_no_extra_pi_old_pass():
    methods = build_methods(AlgorithmConfig(shapers=["vgpo", "entropy"], hidden_states_from="current"))
    assert methods.old_shapers == [] and methods.statistics(ORIGINAL) == [FOCUS]  # the diagnostics only
    assert methods.update_needs_hidden_states and methods.update_needs_entropy
    assert {s.key for s in methods.current_statistics()} == {s.key for m in methods.shapers for s in m.statistics()}


def test_old_shaping_key_gives_the_migration_message(tmp_path):
    with pytest.raises(ConfigError, match=r"algorithm\.shapers"):
        load_config(None, ["algorithm.shaping=vgpo"])
    path = tmp_path / "old.yaml"
    path.write_text("algorithm:\n  shaping: none\n")
    with pytest.raises(ConfigError, match=r"algorithm\.shaping.*algorithm\.shapers"):
        load_config(str(path))
