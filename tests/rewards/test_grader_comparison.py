r"""mathruler vs math-verify on the same answers: where each is looser or stricter.

Run as a script to print the table: ``python tests/rewards/test_grader_comparison.py``.
Columns: given answer (the content of the last \boxed{}), ground truth, mathruler, math_verify.
"""

import importlib.util

import pytest

from megatron_vgpo.rewards.graders import load_grader

CASES = [  # (given, ground truth, mathruler, math_verify)
    # both accept
    ("3.0", "3", 1, 1), ("\\dfrac{1}{2}", "\\frac{1}{2}", 1, 1), ("0.5", "\\frac{1}{2}", 1, 1),
    ("1.5", "\\frac{3}{2}", 1, 1), ("12\\text{ cm}", "12", 1, 1), ("30^\\circ", "30", 1, 1),
    ("50\\%", "50", 1, 1), ("1,000", "1000", 1, 1), ("\\text{B}", "B", 1, 1), ("(A)", "A", 1, 1),
    ("x=2", "2", 1, 1), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}", 1, 1), ("2x+1", "1+2x", 1, 1),
    ("3\\sqrt{3}", "\\sqrt{27}", 1, 1), ("[1,2)", "[1,2)", 1, 1), ("Blue", "blue", 1, 1),
    # both reject
    ("(1, 2)", "(2,1)", 0, 0), ("1.414", "\\sqrt{2}", 0, 0), ("3.14", "\\pi", 0, 0), ("4.0000001", "4", 0, 0),
    ("\\frac{1}{3}", "0.333", 0, 0), ("B. 45", "B", 0, 0), ("red circles", "red", 0, 0),
    # math_verify looser
    ("\\frac{2}{4}", "\\frac{1}{2}", 0, 1), ("2/4", "1/2", 0, 1), ("0.5", "50\\%", 0, 1), ("10\\%", "0.1", 0, 1),
    ("\\{1,2\\}", "\\{2,1\\}", 0, 1), ("2, 3", "3, 2", 0, 1), ("x=1,x=2", "1,2", 0, 1),
    ("1.4142136", "\\sqrt{2}", 0, 1), ("0.3333333", "\\frac{1}{3}", 0, 1), ("5 apples", "5", 0, 1),
    ("8 \\mathrm{cm}^2", "8", 0, 1), ("\\angle ABC = 30^\\circ", "30", 0, 1), ("x \\in [1,2]", "[1,2]", 0, 1),
    ("2^{10}", "1024", 0, 1), ("2/3", "2:3", 0, 1),
    # math_verify stricter
    ("x^2", "x**2", 1, 0), ("1e3", "1000", 1, 0), ("True", "true", 1, 0), ("North East", "north east", 1, 0),
    ("\\text{isosceles triangle}", "isosceles triangle", 1, 0), ("1 1/2", "3/2", 1, 0), ("i", "I", 1, 0),
]

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None


@pytest.fixture(scope="module")
def graders():
    return {"mathruler": load_grader("mathruler"),
            "math_verify": load_grader("math_verify") if HAS_MATH_VERIFY else None}


@pytest.mark.parametrize("given,gt,mr,_", CASES, ids=[f"{c[0]}|{c[1]}" for c in CASES])
def test_mathruler_column(graders, given, gt, mr, _):
    assert int(graders["mathruler"](given, gt)) == mr


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify is optional and not installed (pip install math-verify)")
@pytest.mark.parametrize("given,gt,_,mv", CASES, ids=[f"{c[0]}|{c[1]}" for c in CASES])
def test_math_verify_column(graders, given, gt, _, mv):
    assert int(graders["math_verify"](given, gt)) == mv


def table() -> str:
    g = {"mathruler": load_grader("mathruler"), "math_verify": load_grader("math_verify")}
    lines = [f"{'given':28} {'ground truth':24} mathruler math_verify"]
    for given, gt, _, _ in CASES:
        a, b = int(g["mathruler"](given, gt)), int(g["math_verify"](given, gt))
        lines.append(f"{given:28} {gt:24} {a:^9} {b:^11}{'  differ' if a != b else ''}")
    n = len(CASES)
    both = sum(c[2] and c[3] for c in CASES)
    lines.append(f"{n} cases: mathruler accepts {sum(c[2] for c in CASES)}, math_verify {sum(c[3] for c in CASES)}, "
                 f"both {both}; only math_verify {sum(c[3] and not c[2] for c in CASES)}, "
                 f"only mathruler {sum(c[2] and not c[3] for c in CASES)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
