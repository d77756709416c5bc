r"""The paper's grader (rewards/lookback.py): each of its three rules alone, the lenient single-letter
case, and the grading pool running it as a worker job."""

from __future__ import annotations

import pytest

from megatron_vgpo.config.schema import RewardConfig
from megatron_vgpo.rewards import RewardScorer
from megatron_vgpo.rewards.graders import accuracy, load_grader
from megatron_vgpo.rewards.lookback import lookback_grade, math_verify_rule, mathruler_rule, single_letter_rule

pytest.importorskip("math_verify", reason="the lookback grader needs math-verify (pip install math-verify)")

# (boxed answer, label, mathruler, math-verify, single letter): each row is decided by the rule(s) marked.
CASES = [
    ("1e3", "1000", 1, 0, 0),                       # only mathruler (math-verify does not read 1e3)
    ("North East", "north east", 1, 0, 0),          # only mathruler (text, case)
    ("\\frac{2}{4}", "\\frac{1}{2}", 0, 1, 0),      # only math-verify (unreduced fraction)
    ("5 apples", "5", 0, 1, 0),                     # only math-verify (trailing words)
    ("B. 45", "B", 0, 0, 1),                        # only the letter rule: the option and its value
    ("option b", "B", 0, 0, 1),                     # lenient: the letter in lower case, inside words
    ("(b)", "B", 1, 1, 1),                          # (all three accept an option in parentheses)
    ("A or B", "B", 0, 0, 1),                       # lenient: two options, one of them right
    ("B, C", "B", 0, 0, 1),
    ("\\text{BEAR}", "A", 0, 0, 1),                 # lenient to a fault: any word containing the letter
    ("yes", "B", 0, 0, 0),
    ("C", "B", 0, 0, 0),                            # a wrong option
    ("b", "b", 1, 1, 0),                            # the letter rule needs an UPPERCASE label
    ("AB", "AB", 1, 1, 0),                          # ... of exactly one letter
    ("x", "AB", 0, 0, 0),
    ("3", "2", 0, 0, 0),
]


@pytest.mark.parametrize("given,label,mr,mv,letter", CASES, ids=[f"{c[0]}|{c[1]}" for c in CASES])
def test_each_rule(given, label, mr, mv, letter):
    assert (mathruler_rule(given, label), math_verify_rule(given, label), single_letter_rule(given, label)) == (
        bool(mr), bool(mv), bool(letter))
    assert lookback_grade(given, label) == bool(mr or mv or letter)


def test_reward_reads_the_last_box():
    grade = load_grader("lookback")  # reward.grader=lookback
    assert grade is lookback_grade
    assert accuracy(grade, "<think>B?</think> \\boxed{A} ... \\boxed{B. 45}", "B") == 1.0
    assert accuracy(grade, "\\boxed{B. 45} ... \\boxed{A}", "B") == 0.0
    assert accuracy(grade, "the answer is B", "B") == 0.0  # no box: wrong, as in training
    assert accuracy(grade, "\\boxed{3}", "\\boxed{3}") == 1.0  # a boxed label is unwrapped


def test_grading_pool_runs_it_with_a_timeout():
    with RewardScorer(RewardConfig(grader="lookback", num_workers=1, timeout_s=30.0)) as scorer:
        results = scorer.score(["\\boxed{B. 45}", "\\boxed{\\frac{2}{4}}", "\\boxed{7}"], ["B", "\\frac{1}{2}", "8"])
    assert [r.accuracy for r in results] == [1.0, 1.0, 0.0] and all(r.error is None for r in results)
