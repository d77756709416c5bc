r"""Accuracy graders: is the response's last ``\boxed{}`` answer equal to the ground truth?

``mathruler`` (default: the paper's released code grades with ``mathruler.grader.grade_answer``):
equal if the MATH-style normalised strings match (``\frac``/``\dfrac``, ``\text{}``, units such as
"cm" or "degrees", ``^\circ``, ``$``, ``%``, thousands commas, case) or sympy simplifies the
difference to 0. Strict on numbers: no numeric tolerance, unreduced fractions are wrong, an integer
ground truth is not matched by an expression ("6/2" is not 3, "3.0" is), tuples are ordered.

``math_verify`` (Hugging Face ``math-verify``, optional: ``pip install math-verify``): parses both
sides into sympy and compares numerically (6 decimals) and symbolically. Looser than mathruler on
unreduced fractions, percentages (0.5 = 50%), unordered sets, equations and relations
(``\angle ABC = 30^\circ`` vs 30), trailing words ("5 apples"), powers (2^{10} = 1024) and 6-decimal
approximations of irrationals; stricter on multi-word text, mixed numbers ("1 1/2"), ``1e3`` and
Python syntax (``x**2``). ``tests/rewards/test_grader_comparison.py`` holds the measured table.

Both are imported lazily (in the grading worker), because sympy is slow to import; neither has its
own timeout here: the worker pool enforces ``reward.timeout_s``.
"""

from __future__ import annotations

from typing import Callable

from megatron_vgpo.rewards.extract import last_boxed, unwrap_ground_truth


def _mathruler() -> Callable[[str, str], bool]:
    from mathruler.grader import grade_answer

    return grade_answer


def _math_verify() -> Callable[[str, str], bool]:
    try:
        import math_verify
        from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    except ImportError as e:
        raise ImportError("reward.grader=math_verify needs the math-verify package: pip install math-verify") from e
    # Its signal.alarm timeouts are turned off (None): they only work in a main thread, and the pool
    # already bounds every call. Silence the one-time warning that says so.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    config = [LatexExtractionConfig(), ExprExtractionConfig()]

    def grade(given: str, ground_truth: str) -> bool:
        gold = parse("\\boxed{" + ground_truth + "}", extraction_config=config, parsing_timeout=None)
        pred = parse("\\boxed{" + given + "}", extraction_config=config, parsing_timeout=None)
        if not gold or not pred:
            return False
        return bool(verify(gold, pred, timeout_seconds=None))

    return grade


def _lookback():
    from megatron_vgpo.rewards.lookback import lookback_grade

    return lookback_grade


GRADERS: dict[str, Callable[[], Callable[[str, str], bool]]] = {
    "mathruler": _mathruler,
    "math_verify": _math_verify,
    "lookback": _lookback,  # the VGPO paper's evaluation grader (rewards/lookback.py)
}


def load_grader(name: str) -> Callable[[str, str], bool]:
    """``grade(given_answer, ground_truth) -> bool`` for ``reward.grader``."""
    if name not in GRADERS:
        raise ValueError(f"unknown reward.grader {name!r}; choose one of {sorted(GRADERS)}")
    return GRADERS[name]()


def accuracy(grade: Callable[[str, str], bool], response: str, ground_truth: str) -> float:
    r"""1.0 if the last ``\boxed{}`` of ``response`` grades equal to ``ground_truth``, else 0.0;
    0.0 without a (closed) ``\boxed{}``."""
    answer = last_boxed(response)
    if answer is None:
        return 0.0
    return 1.0 if grade(answer, unwrap_ground_truth(ground_truth)) else 0.0
