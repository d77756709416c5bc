r"""The paper's evaluation grader (Look-Back's, used by VGPO): three rules, any one suffices.

Given the content ``given`` of the response's last ``\boxed{}`` and the label ``ground_truth``:

1. mathruler: ``mathruler.grader.grade_answer(given, ground_truth)`` (the training reward's grader);
2. math-verify: ``verify(parse(ground_truth), parse(given))`` (``graders._math_verify``);
3. single letter: the label is exactly one uppercase letter (a multiple-choice option) and that
   letter occurs anywhere in ``given.upper()``.

Rule 3 is lenient on purpose, as in the paper: ``\boxed{B. 45}`` and ``\boxed{(b)}`` are correct for
label ``B`` (mathruler and math-verify both reject the first), and so is ``\boxed{A or B}``, or any
boxed word that happens to contain the letter. Numbers reported with this grader are comparable
with the paper's; they overstate multiple-choice accuracy a little.

A response without a closed ``\boxed{}`` scores 0 (``extract.last_boxed``, as in training). Registered
as ``reward.grader=lookback`` (``graders.GRADERS``), so the grading worker pool runs it with its
per-call timeout, in evaluation and in training validation alike.
"""

from __future__ import annotations

import functools
from typing import Callable

from megatron_vgpo.rewards.graders import load_grader

@functools.lru_cache(maxsize=None)
def _grader(name: str) -> Callable[[str, str], bool]:
    return load_grader(name)


def mathruler_rule(given: str, ground_truth: str) -> bool:
    return bool(_grader("mathruler")(given, ground_truth))


def math_verify_rule(given: str, ground_truth: str) -> bool:
    return bool(_grader("math_verify")(given, ground_truth))


def single_letter_rule(given: str, ground_truth: str) -> bool:
    """The label is one uppercase letter A-Z that occurs in the upper-cased answer."""
    label = ground_truth.strip()
    return len(label) == 1 and "A" <= label <= "Z" and label in given.upper()


RULES = (mathruler_rule, math_verify_rule, single_letter_rule)


def lookback_grade(given: str, ground_truth: str) -> bool:
    """Correct when any of the three rules accepts ``given`` (in order; the first that accepts decides)."""
    return any(rule(given, ground_truth) for rule in RULES)

