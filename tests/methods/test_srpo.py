"""SRPO (METHODS_SPEC section 6, PROVISIONAL: only the abstract is public): roles located on hand token
sequences and with a real byte-level BPE, the consistency score by hand, the token weights by hand
(positive, sign-preserving, A = 0 stays 0) and against a per-token loop reference written from the
module docstring for every option, the statistics through the actor's real pi_old pass, the tokenizer
seam of ``build_methods``, and the "[provisional]" label in the config reference and the README."""

import itertools
import math
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_vgpo.config import ConfigError, load_config
from megatron_vgpo.config.reference import BEGIN, END, config_reference_markdown, iter_fields
from megatron_vgpo.config.schema import AlgorithmConfig
from megatron_vgpo.methods import SHAPERS, ShapingInputs, build_methods
from megatron_vgpo.methods.srpo import (
    SRPOConfig,
    SRPOShaper,
    TokenTexts,
    locate_perception,
    perception_consistency,
    perception_mask,
    srpo_weights,
)
from megatron_vgpo.methods.vppo import VPPOConfig, visual_dependency
from tests.methods.test_contract import _permute, _shaping_inputs

T = torch.tensor
B_ = torch.bool
README = Path(__file__).resolve().parents[2] / "README.md"

# --------------------------------------------------------------------------------------------- roles

# A hand vocabulary: id -> the token's own decoding. Tags are split and merged the way a byte-level BPE
# with Qwen2's pre-tokenizer does it ("<think" + ">", "<" + "perception" + ">\n", "</" + "think" + ">").
VOCAB = ["<think", ">", "\n", "<", "perception", ">\n", "</", "think", "The", " circle", " has", " r", "=", "3",
         ".", "So", " area", " is", " 9", " \\boxed{9}", "<|im_end|>", "<perception>", "</perception>"]
ID = {text: i for i, text in enumerate(VOCAB)}
TEXTS = TokenTexts.from_list(VOCAB)


def ids(*pieces):
    return np.array([ID[p] for p in pieces], dtype=np.int64)


def located(cfg, *pieces):
    """The pieces located as perception."""
    mask = locate_perception(ids(*pieces), cfg, TEXTS)
    return [p for p, m in zip(pieces, mask) if m]


def test_perception_inside_the_tags_however_they_are_tokenised():
    cfg = SRPOConfig()
    # one token per tag: exactly the content
    assert located(cfg, "<think", ">", "\n", "<perception>", "The", " circle", " has", " r", "=", "3", ".",
                   "</perception>", "\n", "So", " area", "</", "think", ">") == ["The", " circle", " has", " r", "=",
                                                                                 "3", "."]
    # split tags: "<" "perception" ">\n" opens, "</" "perception" ">" closes; a token is inside the span
    # when all its characters are: ">\n", merged across the tag's end, counts as the tag's
    assert located(cfg, "<", "perception", ">\n", "The", " circle", ".", "</", "perception", ">", "So") == [
        "The", " circle", "."]
    # unclosed: to the end of the response
    assert located(cfg, "<think", ">", "<perception>", "The", " circle", "<|im_end|>") == ["The", " circle",
                                                                                          "<|im_end|>"]
    # only the first perception span counts
    assert located(cfg, "<perception>", "The", "</perception>", "<perception>", "So", "</perception>") == ["The"]


def test_without_perception_tags_the_start_of_the_think_span_then_of_the_response():
    cfg = SRPOConfig(perception_fraction=0.3)
    # think content: the 10 tokens between "<think" ">" and "</" "think" ">"; k = ceil(0.3 * 10) = 3
    # (0.3 * 10 = 3.0000000000000004 in floating point: rounded before the ceil)
    content = ["The", " circle", " has", " r", "=", "3", ".", "So", " area", " is"]
    assert located(cfg, "<think", ">", *content, "</", "think", ">", " \\boxed{9}") == ["The", " circle", " has"]
    # unclosed think: its content runs to the end (7 tokens, k = ceil(2.1) = 3)
    assert located(cfg, "\n", "<think", ">", "The", " circle", " has", " r", "=", "3", ".") == ["The", " circle",
                                                                                               " has"]
    # no tag at all: the first ceil(0.3 * 7) = 3 tokens of the response
    assert located(cfg, "The", " circle", " has", " r", "=", "3", ".") == ["The", " circle", " has"]
    # 1 token: ceil(0.3) = 1; fraction 0: no perception token
    assert located(cfg, "The") == ["The"]
    assert located(replace(cfg, perception_fraction=0.0), "The", " circle") == []


def test_role_options():
    tagged = ("<think", ">", "So", " area", "<perception>", "The", " circle", "</perception>", " is", "</", "think",
              ">")
    untagged = ("<think", ">", "So", " area", " is", "</", "think", ">")
    f = 0.5
    assert located(SRPOConfig(roles="auto", perception_fraction=f), *tagged) == ["The", " circle"]
    assert located(SRPOConfig(roles="tags", perception_fraction=f), *tagged) == ["The", " circle"]
    assert located(SRPOConfig(roles="tags", perception_fraction=f), *untagged) == []
    # think_prefix ignores the perception tags: ceil(0.5 * 7) = 4 of the 7 content tokens
    assert located(SRPOConfig(roles="think_prefix", perception_fraction=f), *tagged) == ["So", " area",
                                                                                        "<perception>", "The"]
    # prefix ignores every tag: ceil(0.5 * 12) = 6 response tokens; it needs no tokenizer
    mask = locate_perception(ids(*tagged), SRPOConfig(roles="prefix", perception_fraction=f), None)
    assert mask.tolist() == [True] * 6 + [False] * 6
    # other tag strings
    cfg = SRPOConfig(perception_open="So", perception_close=" is")
    assert located(cfg, *untagged) == [" area"]


def test_tag_roles_without_a_tokenizer_say_what_to_do():
    with pytest.raises(ValueError, match=r"algorithm\.srpo\.roles='auto'.*tokenizer.*roles=prefix"):
        locate_perception(ids("The"), SRPOConfig(), None)


def test_perception_mask_reads_the_response_only_and_ids_beyond_the_table():
    # The prompt mentions the tags (an instruction about the format): only the response is searched.
    # Row 1: an id beyond the vocabulary (a padded-vocabulary row of the output layer) decodes to "".
    prompt = [ID["<perception>"], ID["The"], ID["</perception>"]]
    rows = [prompt + [ID["So"], ID["<perception>"], ID[" circle"], ID["</perception>"]],
            prompt + [ID["<perception>"], 10_000, ID["."], ID["</perception>"], 0]]
    input_ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=B_)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = T(row)
        mask[i, 3:len(row)] = True
    got = perception_mask(input_ids, mask, SRPOConfig(), TEXTS)
    assert got.tolist() == [[False] * 5 + [True] + [False] * 3,
                            [False] * 4 + [True, True] + [False] * 3]


def test_roles_with_a_real_byte_level_bpe():
    # The tiny checkpoint's tokenizer: a byte-level BPE with Qwen2's pre-tokenizer, which merges "<think"
    # into one token and splits "<perception>" into several (as Qwen2's does).
    from transformers import PreTrainedTokenizerFast

    from megatron_vgpo.models.qwen2_5_vl.tiny import build_tokenizer

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer())
    texts = TokenTexts.from_tokenizer(tokenizer)
    cases = [
        ("<think>\n<perception>The circle has radius 3.</perception>\nSo the area is 9\\pi.</think> \\boxed{9\\pi}",
         "The circle has radius 3."),
        # the last space merges into " </": the tag's token, not perception
        (" <perception> The chart shows 37 visitors on Thursday. </perception> So the answer is 37.",
         " The chart shows 37 visitors on Thursday."),
    ]
    for text, perception in cases:
        token_ids = np.array(tokenizer.encode(text), dtype=np.int64)
        mask = locate_perception(token_ids, SRPOConfig(), texts)
        assert tokenizer.decode(token_ids[mask].tolist()) == perception
    # without tags: the first ceil(0.3 n) tokens of the think content
    token_ids = np.array(tokenizer.encode("<think> Let me read the figure first. </think> \\boxed{5}"), dtype=np.int64)
    text, start, end = texts.pieces(token_ids)
    content = (start >= text.index(">") + 1) & (end <= text.index("</think>"))
    mask = locate_perception(token_ids, SRPOConfig(), texts)
    k = math.ceil(0.3 * int(content.sum()))
    assert mask.sum() == k and (np.flatnonzero(mask) == np.flatnonzero(content)[:k]).all()


# ------------------------------------------------------------------------------------- consistency


def test_consistency_by_hand():
    # Row 0, d = 2: perception tokens at 1, 2 with h = (1, 0), (3, 0): m = (2, 0).
    #   reasoning h = (0, 1): cos 0 -> 0.5; (-1, 0): cos -1 -> 0; (2, 2): cos 1/sqrt(2) -> (1 + 0.70710678) / 2
    # Row 1: no perception token: no reasoning score (0).
    # Position 0 is the prompt, position 6 padding: 0.
    h = T([[[9.0, 9.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 2.0], [5.0, 5.0]],
           [[9.0, 9.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [2.0, 2.0], [5.0, 5.0]]])
    response = T([[0, 1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1, 0]], dtype=B_)
    perception = T([[0, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=B_)
    c = perception_consistency(h, perception, response)
    torch.testing.assert_close(c, T([[0, 0, 0, 0.5, 0.0, 0.85355339, 0], [0.0] * 7]))
    # bf16 hidden states are read in float32
    c16 = perception_consistency(h.bfloat16(), perception, response)
    assert c16.dtype == torch.float32
    torch.testing.assert_close(c16, c)


# ----------------------------------------------------------------------------------------- weights

# Hand case, defaults (minmax, baseline tokens, linear, strength 0.5, w_min 0.2, w_max 2). One response
# shape for rows 0-3: 6 tokens at positions 1..6 (position 0 prompt, 7 padding); perception = 1, 2, 3.
#   D (perception) = [0, 0.71828183, 0] -> min-max [0, 1, 0]
#   c (reasoning)  = [0.5, 0.9, 0.7]    -> min-max [0, 1, 0.5]
#   b = (0 + 1 + 0 + 0 + 1 + 0.5) / 6 = 2.5 / 6 = 5/12
#   w = 1 + 0.5 (s - 5/12): s = 0 -> 19/24 = 0.79166667; s = 1 -> 31/24 = 1.29166667; s = 0.5 -> 25/24
#   (mean (3 * 19 + 2 * 31 + 25) / 24 / 6 = 1: linear weights around the token-mean baseline have mean 1)
# Row 0: A = 2 -> 2 w. Row 1: A = -1 -> -w (still negative). Row 2: A = 0 -> 0.
# Row 3: no image -> w = 1, A' = A = 1.
# Row 4: A = 1.5; perception D all 0 (constant: unscored, w = 1); reasoning c = [0.2, 0.6] -> [0, 1], b = 1/2,
#   w = [0.75, 1.25] -> A' = [1.5, 1.5, 1.5, 1.125, 1.875] (5 tokens at 1..5).
E1 = math.e - 2  # D = k3(l_aug, l_old) with l_aug - l_old = 1
W0, W1, WH = 19 / 24, 31 / 24, 25 / 24
RESP = T([[0, 1, 1, 1, 1, 1, 1, 0]] * 4 + [[0, 1, 1, 1, 1, 1, 0, 0]], dtype=B_)
PERC = T([[0, 1, 1, 1, 0, 0, 0, 0]] * 5, dtype=B_)
D_ROW = [0.0, 0.0, E1, 0.0, 0.0, 0.0, 0.0, 0.0]
HAND_D = T([D_ROW] * 4 + [[0.0] * 8])
C_ROW = [0.0, 0.0, 0.0, 0.0, 0.5, 0.9, 0.7, 0.0]
HAND_C = T([C_ROW] * 4 + [[0.0, 0.0, 0.0, 0.0, 0.2, 0.6, 0.0, 0.0]])
HAS_IMAGE = T([1, 1, 1, 0, 1], dtype=B_)
HAND_A = T([2.0, -1.0, 0.0, 1.0, 1.5])
W_ROW = [0.0, W0, W1, W0, W0, W1, WH, 0.0]


def _inputs(D, c, perception, mask, outcome, has_image, cfg=None):
    """Shaping inputs as the trainer builds them, the log-probs chosen so that the shaper sees ``D``:
    l_old = 0 and l_aug = the log-ratio d >= 0 with k3 = D."""
    shaper = SRPOShaper(cfg or SRPOConfig())
    l_old = torch.zeros(mask.shape)
    l_aug = _k3_inverse(D)
    return shaper, ShapingInputs(
        advantages=outcome.unsqueeze(-1) * mask, outcome=outcome, response_mask=mask, loss_mask=mask.clone(),
        group_ids=torch.arange(len(outcome)), has_image=has_image, old_logprobs=l_old,
        stats={shaper.roles.key: perception.float(), shaper.consistency.key: c, shaper.aug.key: l_aug})


def _k3_inverse(D):
    """The log-ratio d >= 0 with exp(d) - d - 1 = D (bisection, float64), so that k3(l_aug, 0) = D."""
    lo, hi = torch.zeros(D.shape, dtype=torch.float64), torch.full(D.shape, 5.0, dtype=torch.float64)
    for _ in range(200):
        mid = (lo + hi) / 2
        big = mid.exp() - mid - 1 > D.double()
        hi, lo = torch.where(big, mid, hi), torch.where(big, lo, mid)
    return ((lo + hi) / 2).float()


def test_weights_by_hand():
    w, P, R = srpo_weights(HAND_D, HAND_C, PERC, RESP, HAS_IMAGE, SRPOConfig())
    expected = T([W_ROW, W_ROW, W_ROW, [0.0] + [1.0] * 6 + [0.0], [0.0, 1, 1, 1, 0.75, 1.25, 0, 0]])
    torch.testing.assert_close(torch.where(RESP, w, torch.zeros(())), expected)
    assert P.sum(-1).tolist() == [3, 3, 3, 0, 0] and R.sum(-1).tolist() == [3, 3, 3, 0, 2]
    assert (w[RESP] > 0).all()
    assert [float(w[i][RESP[i]].mean()) for i in range(5)] == pytest.approx([1.0] * 5)


def test_shaper_by_hand_positive_weights_keep_the_sign_and_zero_stays_zero():
    shaper, inputs = _inputs(HAND_D, HAND_C, PERC, RESP, HAND_A, HAS_IMAGE)
    torch.testing.assert_close(visual_dependency(inputs.stats[shaper.aug.key], inputs.old_logprobs, RESP)[0],
                               HAND_D[0] * RESP[0])
    result = shaper.shape(inputs)
    w = T(W_ROW)
    expected = torch.stack([2.0 * w, -1.0 * w, 0.0 * w, T([0.0] + [1.0] * 6 + [0.0]),
                            T([0.0, 1.5, 1.5, 1.5, 1.125, 1.875, 0.0, 0.0])])
    torch.testing.assert_close(result.advantages, expected)
    A = inputs.advantages
    assert (torch.sign(result.advantages) == torch.sign(A)).all()  # GRPO's direction, token by token
    assert (result.advantages[2] == 0).all()  # A = 0 stays 0
    assert torch.equal(result.loss_mask, RESP)  # SRPO weights, it does not filter
    m = result.metrics.reduce()
    # 29 response tokens; perception 3 per row (15); scored: 6 x 3 (rows 0-2) + 2 (row 4) = 20
    assert m["srpo/perception_fraction"] == pytest.approx(15 / 29)
    assert m["srpo/rows_with_perception"] == pytest.approx(1.0)
    assert m["srpo/scored_fraction"] == pytest.approx(20 / 29)
    # D over the perception tokens of rows with an image: 3 rows x E1 over 12 tokens
    assert m["srpo/visual_dependency"] == pytest.approx(3 * E1 / 12, rel=1e-5)
    # c over reasoning tokens of rows with an image: (3 x 2.1 + 0.8) / 11
    assert m["srpo/consistency"] == pytest.approx((3 * 2.1 + 0.8) / 11, rel=1e-6)
    assert m["srpo/weight_perception"] == pytest.approx((3 * (2 * W0 + W1) + 3 + 3) / 15, rel=1e-6)
    assert m["srpo/weight_reasoning"] == pytest.approx((3 * (W0 + W1 + WH) + 3 + 0.75 + 1.25) / 14, rel=1e-6)
    assert m["srpo/weight_min"] == pytest.approx(0.75) and m["srpo/weight_max"] == pytest.approx(W1)


def test_clamped_and_exponential_weights_by_hand():
    # strength 10, linear: 1 + 10 (s - 5/12): s = 0 -> -37/6 -> w_min 0.2; s = 1 -> 41/6 -> w_max 2;
    # s = 0.5 -> 1 + 10/12 = 1.8333. Positive however strong: the sign of A never flips.
    cfg = SRPOConfig(strength=10.0)
    w, _, _ = srpo_weights(HAND_D[:1], HAND_C[:1], PERC[:1], RESP[:1], HAS_IMAGE[:1], cfg)
    torch.testing.assert_close(w[0, 1:7], T([0.2, 2.0, 0.2, 0.2, 2.0, 1 + 10 / 12]))
    # exp, strength 1: exp(s - 5/12) = exp(-5/12) 0.65924063, exp(7/12) 1.79200249, exp(1/12) 1.08690405
    lo, hi, mid = math.exp(-5 / 12), math.exp(7 / 12), math.exp(1 / 12)
    cfg = SRPOConfig(weight="exp", strength=1.0)
    w, _, _ = srpo_weights(HAND_D[:1], HAND_C[:1], PERC[:1], RESP[:1], HAS_IMAGE[:1], cfg)
    torch.testing.assert_close(w[0, 1:7], T([lo, hi, lo, lo, hi, mid]))
    # mean_one: divided by the mean (3 lo + 2 hi + mid) / 6 = 1.10810...
    mean = (3 * lo + 2 * hi + mid) / 6
    w, _, _ = srpo_weights(HAND_D[:1], HAND_C[:1], PERC[:1], RESP[:1], HAS_IMAGE[:1], replace(cfg, mean_one=True))
    torch.testing.assert_close(w[0, 1:7], T([lo, hi, lo, lo, hi, mid]) / mean)
    # baseline 'roles': b = (mean perception 1/3 + mean reasoning 1/2) / 2 = 5/12 here too (3 and 3 tokens);
    # with row 4's roles (perception unscored): b = the reasoning mean 1/2, w = [0.75, 1.25] as before.
    w, _, _ = srpo_weights(HAND_D, HAND_C, PERC, RESP, HAS_IMAGE, SRPOConfig(baseline="roles"))
    torch.testing.assert_close(w[0, 1:7], T(W_ROW[1:7]))
    torch.testing.assert_close(w[4, 4:6], T([0.75, 1.25]))


def test_baselines_differ_when_the_roles_have_different_sizes():
    # 1 perception... minmax needs 2: perception D = [0, E1] -> [0, 1]; reasoning c = [0.1, 0.3, 0.5, 0.9]
    #   -> [0, 0.25, 0.5, 1]. tokens: b = (0 + 1 + 0 + 0.25 + 0.5 + 1) / 6 = 2.75 / 6 = 11/24;
    #   roles: b = (1/2 + 1.75/4) / 2 = (0.5 + 0.4375) / 2 = 0.46875.
    D = T([[0.0, E1, 0.0, 0.0, 0.0, 0.0]])
    c = T([[0.0, 0.0, 0.1, 0.3, 0.5, 0.9]])
    perception, mask, has_image = T([[1, 1, 0, 0, 0, 0]], dtype=B_), torch.ones(1, 6, dtype=B_), T([True])
    s = T([0.0, 1.0, 0.0, 0.25, 0.5, 1.0])
    for baseline, b in (("tokens", 11 / 24), ("roles", 0.46875)):
        w, _, _ = srpo_weights(D, c, perception, mask, has_image, SRPOConfig(baseline=baseline))
        torch.testing.assert_close(w[0], 1 + 0.5 * (s - b))


def test_fixed_normalisation_by_hand():
    # fixed: s = D / 10 on perception, c on reasoning; D = [0, 5, 10] -> [0, 0.5, 1]; c = [0.2, 0.8]
    #   b = (0 + 0.5 + 1 + 0.2 + 0.8) / 5 = 0.5; w = 1 + 0.5 (s - 0.5) = [0.75, 1, 1.25, 0.85, 1.15]
    D = T([[0.0, 5.0, 10.0, 0.0, 0.0]])
    c = T([[0.0, 0.0, 0.0, 0.2, 0.8]])
    perception, mask = T([[1, 1, 1, 0, 0]], dtype=B_), torch.ones(1, 5, dtype=B_)
    w, _, _ = srpo_weights(D, c, perception, mask, T([True]), SRPOConfig(normalize="fixed"))
    torch.testing.assert_close(w[0], T([0.75, 1.0, 1.25, 0.85, 1.15]))


def test_strength_zero_is_plain_grpo():
    shaper, inputs = _inputs(HAND_D, HAND_C, PERC, RESP, HAND_A, HAS_IMAGE, SRPOConfig(strength=0.0))
    torch.testing.assert_close(shaper.shape(inputs).advantages, inputs.advantages)


# ------------------------------------------------------------------------------- loop reference

def _reference_weights(D, c, perception, mask, has_image, cfg):
    """Steps 4-6 of the module docstring, token by token."""
    B, L = mask.shape
    w = [[1.0] * L for _ in range(B)]
    for i in range(B):
        tokens = [t for t in range(L) if mask[i, t]]
        P = [t for t in tokens if perception[i, t]] if has_image[i] else []
        R = [t for t in tokens if not perception[i, t]] if P else []
        s, roles = {}, []
        for role, x, fixed_scale in ((P, D, 10.0), (R, c, 1.0)):
            values = {t: float(x[i, t]) for t in role}
            if cfg.normalize == "minmax":
                if len(values) < 2 or max(values.values()) - min(values.values()) <= 1e-6:
                    continue
                lo, hi = min(values.values()), max(values.values())
                values = {t: (v - lo) / (hi - lo) for t, v in values.items()}
            else:
                values = {t: min(max(v / fixed_scale, 0.0), 1.0) for t, v in values.items()}
            if values:
                s.update(values)
                roles.append(sum(values.values()) / len(values))
        if s:
            b = sum(s.values()) / len(s) if cfg.baseline == "tokens" else sum(roles) / len(roles)
            for t, v in s.items():
                z = cfg.strength * (v - b)
                w[i][t] = min(max(1 + z if cfg.weight == "linear" else math.exp(z), cfg.w_min), cfg.w_max)
        if cfg.mean_one and tokens:
            mean = sum(w[i][t] for t in tokens) / len(tokens)
            for t in tokens:
                w[i][t] /= mean
    return torch.tensor(w)


def _random_case(seed, B=10, L=14):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(B, L, dtype=B_)
    for i in range(B):
        start = int(torch.randint(0, 3, (1,), generator=g))
        mask[i, start:start + int(torch.randint(1, L - start, (1,), generator=g))] = True
    perception = mask & (torch.rand(B, L, generator=g) < 0.4)
    perception[0] = False  # no perception token: no reasoning score either
    perception[1] = mask[1] & (torch.cumsum(mask[1], 0) == 1)  # one perception token (unscored under minmax)
    D = torch.where(torch.rand(B, L, generator=g) < 0.3, torch.zeros(()), torch.rand(B, L, generator=g) * 12).clamp(max=10)
    D[2] = 0.0  # constant perception scores
    c = torch.rand(B, L, generator=g)
    has_image = torch.rand(B, generator=g) > 0.2
    return D * mask, c * mask, perception, mask, has_image


OPTION_GRID = [SRPOConfig(normalize=n, baseline=b, weight=w, mean_one=m, strength=s)
               for n, b, w, m, s in itertools.product(("minmax", "fixed"), ("tokens", "roles"), ("linear", "exp"),
                                                      (False, True), (0.5, 4.0))]


@pytest.mark.parametrize("cfg", OPTION_GRID, ids=lambda c: f"{c.normalize}-{c.baseline}-{c.weight}-mean1{int(c.mean_one)}"
                                                           f"-s{c.strength:g}")
def test_weights_match_the_loop_reference(cfg):
    for seed in range(3):
        D, c, perception, mask, has_image = _random_case(seed)
        w, _, _ = srpo_weights(D, c, perception, mask, has_image, cfg)
        ref = _reference_weights(D, c, perception, mask, has_image, cfg)
        torch.testing.assert_close(torch.where(mask, w, torch.zeros(())), torch.where(mask, ref, torch.zeros(())),
                                   atol=1e-5, rtol=1e-5)
        assert (w[mask] > 0).all()
        if not cfg.mean_one:
            assert (w[mask] >= cfg.w_min - 1e-6).all() and (w[mask] <= cfg.w_max + 1e-6).all()


# --------------------------------------------------------------------- contract on the variants

VARIANTS = [SRPOConfig(weight="exp", strength=3.0, mean_one=True), SRPOConfig(normalize="fixed", baseline="roles"),
            SRPOConfig(strength=50.0)]


@pytest.mark.parametrize("cfg", VARIANTS, ids=["exp-mean1", "fixed-roles", "strong"])
@pytest.mark.parametrize("seed", [0, 1])
def test_variants_keep_the_plug_in_contract_and_the_sign(cfg, seed):
    # (the defaults run in test_contract.py's registry loop)
    shaper = SRPOShaper(cfg)
    inputs = _shaping_inputs([shaper], seed)
    mask = inputs.response_mask
    result = shaper.shape(inputs)
    assert torch.isfinite(result.advantages).all() and (result.advantages[~mask] == 0).all()
    assert torch.equal(result.loss_mask, inputs.loss_mask)
    assert (torch.sign(result.advantages) == torch.sign(inputs.advantages)).all()
    perm = torch.randperm(mask.shape[0], generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(shaper.shape(_permute(inputs, perm)).advantages, result.advantages[perm])


# --------------------------------------------------------------------- statistics and the seam


class _Tokenizer:
    """The hand vocabulary as a Hugging Face-like tokenizer (``len``, ``batch_decode``)."""

    def __len__(self):
        return len(VOCAB)

    def batch_decode(self, sequences, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        assert not skip_special_tokens and not clean_up_tokenization_spaces
        return ["".join(VOCAB[i] for i in seq) for seq in sequences]


def test_build_methods_passes_the_tokenizer_and_shares_vppos_view():
    methods = build_methods(AlgorithmConfig(shapers=["srpo"]), tokenizer=_Tokenizer())
    (shaper,) = methods.shapers
    assert isinstance(shaper, SRPOShaper) and list(shaper.roles.texts.texts) == VOCAB + [""]
    assert build_methods(AlgorithmConfig(shapers=["srpo"])).shapers[0].roles.texts is None
    # roles and consistency on the original view, D on VPPO's: with VPPO too, no third pass
    assert SRPOConfig().view == VPPOConfig().view
    assert len(build_methods(AlgorithmConfig(shapers=["vppo", "srpo"])).views()) == 2
    noisy = AlgorithmConfig(shapers=["srpo"], srpo=SRPOConfig(corruption="gaussian_noise", noise_step=300))
    assert build_methods(noisy).views()[1].key == "gaussian_noise(t=300,per_row)"
    # statistics keyed by what determines them
    assert SRPOShaper(SRPOConfig()).roles.key == SRPOShaper(SRPOConfig(strength=2.0)).roles.key
    assert SRPOShaper(SRPOConfig()).roles.key != SRPOShaper(SRPOConfig(perception_fraction=0.5)).roles.key
    assert SHAPERS["srpo"].needs_tokenizer and not SHAPERS["vgpo"].needs_tokenizer
    with pytest.raises(ValueError, match="current"):
        build_methods(AlgorithmConfig(shapers=["srpo"], hidden_states_from="current"))


def test_statistics_compute_from_a_micro_batch():
    shaper = SRPOShaper(SRPOConfig(), tokenizer=_Tokenizer())
    row = ids("<think", ">", "<perception>", "The", " circle", "</perception>", "So", " area")
    input_ids = torch.cat([T([ID["."]]), torch.from_numpy(row)]).unsqueeze(0)  # one prompt token
    response = torch.ones_like(input_ids, dtype=B_)
    response[0, 0] = False
    h = torch.randn(1, input_ids.shape[1], 4, generator=torch.Generator().manual_seed(0))
    batch, output = SimpleNamespace(input_ids=input_ids, response_mask=response), SimpleNamespace(hidden_states=h)
    roles = shaper.roles.compute(batch, output)
    assert roles.dtype == torch.float32 and roles[0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0, 0]
    torch.testing.assert_close(shaper.consistency.compute(batch, output),
                               perception_consistency(h, roles.bool(), response))


def test_statistics_through_the_actors_pi_old_pass(world_of_one):
    # The real forward-only schedule with a stand-in chunk whose hidden state at each position is an
    # embedding of the token there: the statistics come back token-aligned, per row, as computed directly.
    from megatron_vgpo.training.experience import build_experience
    from megatron_vgpo.training.micro_batch import RowImages
    from tests.training.test_device_placement import RecordingChunk, meta_actor
    from tests.training.test_micro_batch import IMAGE_PAD, SPEC, example

    table = torch.randn(IMAGE_PAD + 1, 8, generator=torch.Generator().manual_seed(3))

    class EmbeddingChunk(RecordingChunk):
        def forward(self, input_ids, return_hidden_states=True, **kwargs):
            out = super().forward(input_ids, return_hidden_states=return_hidden_states, **kwargs)
            return replace(out, hidden_states=table[input_ids] * self.weight.sum() / 8)

    actor, chunk = meta_actor(world_of_one)
    cpu = torch.device("cpu")
    actor.device = cpu
    actor.chunks = actor.model = [EmbeddingChunk(chunk.config, cpu)]
    a, b = example("a", [(56, 56)], []), example("b", [(56, 84)], [])
    prompts = [a, a, b]
    responses = [ids("<perception>", "The", " circle", "</perception>", "So", " area").tolist(),
                 ids("The", " circle", " has", " r").tolist(),
                 ids("<think", ">", "So", " area", " is", "</", "think", ">", " 9").tolist()]
    exp = build_experience([p.input_ids for p in prompts], responses, [[-0.5] * len(r) for r in responses],
                           [0, 0, 1], [1.0, 0.0, 1.0], RowImages.from_prompts(prompts, SPEC, load_pixels=True),
                           pad_token_id=0, image_token_id=IMAGE_PAD, device=cpu)
    shaper = SRPOShaper(SRPOConfig(), tokenizer=_Tokenizer())
    _, stats = actor.forward_statistics(exp, [shaper.roles, shaper.consistency])
    roles = stats[shaper.roles.key].bool()
    located_rows = [[VOCAB[int(t)] for t in exp.input_ids[i][roles[i]]] for i in range(3)]
    # row 0: tags; row 1: no tag, ceil(0.3 * 4) = 2 tokens; row 2: ceil(0.3 * 3) = 1 token of the think content
    assert located_rows == [["The", " circle"], ["The", " circle"], ["So"]]
    expected = perception_consistency(table[exp.input_ids], roles, exp.response_mask)
    torch.testing.assert_close(stats[shaper.consistency.key], expected)
    assert (expected[exp.response_mask & ~roles] != 0).all()


# ---------------------------------------------------------------------- the provisional label


def _srpo_rows(table: str) -> list[tuple[str, str]]:
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `algorithm.srpo.")]
    return [(r[0].strip("| `"), r[-1].rstrip(" |")) for r in rows]


def test_every_srpo_field_is_labelled_provisional_in_the_config_reference_and_the_readme():
    fields = [path for path, *_ in iter_fields(AlgorithmConfig, "algorithm.") if path.startswith("algorithm.srpo.")]
    assert len(fields) == len(SRPOConfig.__dataclass_fields__) >= 10
    for path, _, _, help in iter_fields(AlgorithmConfig, "algorithm."):
        if path.startswith("algorithm.srpo."):
            assert help.startswith("[provisional] "), path
    # `python tools/config_reference.py` prints this table; the README embeds it
    reference = config_reference_markdown()
    readme = README.read_text()
    embedded = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    for table in (reference, embedded):
        rows = _srpo_rows(table)
        assert [p for p, _ in rows] == fields
        assert all(meaning.startswith("[provisional]") for _, meaning in rows), rows


def test_readme_says_the_equations_are_not_public():
    methods = README.read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
    srpo = methods[methods.index("SRPO"):]
    assert re.search(r"provisional", srpo, re.I) and re.search(r"not public", srpo)
    assert "algorithm.shapers=[srpo]" in methods


def test_config_overrides_and_validation():
    cfg = load_config(None, ["algorithm.shapers=[srpo]", "algorithm.srpo.weight=exp",
                             "algorithm.srpo.perception_open=<look>", "algorithm.srpo.w_min=0.5"])
    assert cfg.algorithm.srpo.weight == "exp" and cfg.algorithm.srpo.perception_open == "<look>"
    for bad in ["algorithm.srpo.w_min=0", "algorithm.srpo.w_max=0.5", "algorithm.srpo.roles=everything",
                "algorithm.srpo.strength=-1"]:
        with pytest.raises(ConfigError, match=re.escape(bad.split("=")[0].split(".")[-1])):
            load_config(None, [bad])
    with pytest.raises(ValueError, match="think_open"):
        SRPOConfig(think_open="")


def test_a_training_step_with_srpo_on_the_tiny_model(tmp_path):
    # The whole path on the CPU: build_trainer hands the processor's tokenizer to the shaper, the pi_old
    # pass computes the roles and the consistency on the real model's hidden states, VPPO's masked view
    # gives D, and the logged perception fraction is the tagged span's share of the response.
    from megatron_vgpo.data.synthetic import write_synthetic_dataset
    from megatron_vgpo.distributed import destroy_parallel
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, load_processor, write_tiny_checkpoint
    from megatron_vgpo.trainer import Trainer
    from tests.conftest import REPO
    from tests.training.test_colocation import RecordingEngine

    model = write_tiny_checkpoint(tmp_path / "tiny", TinyOptions(seed=0))
    write_synthetic_dataset(tmp_path / "data", train=8, val=4, seed=0)
    cfg = load_config(REPO / "examples" / "configs" / "cpu_tiny.yaml", [
        f"model.hf_path={model}", f"data.train_files=[{tmp_path / 'data' / 'train.parquet'}]", "data.val_files=[]",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}", "checkpoint.save_interval=0",
        f"logging.tensorboard_dir={tmp_path / 'runs'}", "logging.progress_bar=false", "trainer.total_steps=1",
        "trainer.val_interval=0", "trainer.val_before_train=false", "trainer.format_warmup.steps=0",
        "data.rollout_batch_size=2", "trainer.global_batch_size=2", "trainer.micro_batch_size=2", "rollout.n=2",
        "algorithm.dynamic_sampling.enable=false", "algorithm.shapers=[srpo]"])
    tokenizer = load_processor(model).tokenizer
    head = tokenizer.encode("<think> <perception>", add_special_tokens=False)
    span = tokenizer.encode("<think> <perception> The circle has radius 3.", add_special_tokens=False)
    response = tokenizer.encode("<think> <perception> The circle has radius 3.</perception> So the area is 9. "
                                "</think> \\boxed{9}", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert response[:len(span)] == span and span[:len(head)] == head  # the span's tokens as the model sees them
    n_perception = len(span) - len(head)
    metrics = {}
    try:
        trainer = Trainer.from_config(cfg, engine=RecordingEngine([], response))
        compute = trainer.compute_advantages
        trainer.compute_advantages = lambda *a: (lambda m: (metrics.update(m), m)[1])(compute(*a))
        trainer.train()
    finally:
        destroy_parallel()
    assert metrics["srpo/perception_fraction"] == pytest.approx(n_perception / len(response))
    assert metrics["srpo/rows_with_perception"] == 1.0
    assert 0 < metrics["srpo/weight_min"] <= 1 <= metrics["srpo/weight_max"]
    assert all(math.isfinite(v) for k, v in metrics.items() if k.startswith("srpo/")), metrics


def test_the_provisional_label_shows_in_the_config_help_of_the_cli():
    """``python -m megatron_vgpo.train --help-config algorithm.srpo``: every SRPO field, each labelled."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "megatron_vgpo.train", "--help-config", "algorithm.srpo"],
                          cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    fields = [path for path, *_ in iter_fields(AlgorithmConfig, "algorithm.") if path.startswith("algorithm.srpo.")]
    assert [line.split(" ")[0] for line in lines] == fields
    assert all("): [provisional] " in line for line in lines), lines
