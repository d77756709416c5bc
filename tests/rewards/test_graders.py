r"""Hand cases for the mathruler grader on whole responses (extraction + equivalence)."""

import pytest

from megatron_vgpo.rewards.graders import accuracy, load_grader


@pytest.fixture(scope="module")
def mathruler():
    return load_grader("mathruler")


@pytest.mark.parametrize("response,gt,expected", [
    # fractions
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "1/2", 1.0),
    ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}", 0.0),          # unreduced fractions are not accepted
    # \frac vs decimal
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{3}{2}}", "1.5", 1.0),
    ("\\boxed{0.333}", "\\frac{1}{3}", 0.0),                 # no numeric tolerance
    ("\\boxed{3.0}", "3", 1.0),
    # units and text
    ("\\boxed{12 cm}", "12", 1.0),
    ("\\boxed{12\\text{ cm}}", "12", 1.0),
    ("\\boxed{30^\\circ}", "30", 1.0),
    ("\\boxed{50\\%}", "50", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{\\text{B}}", "B", 1.0),
    ("\\boxed{(B)}", "B", 1.0),
    ("\\boxed{blue}", "Blue", 1.0),
    ("\\boxed{5 apples}", "5", 0.0),                         # only known units are stripped
    # symbolic
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt{2}}", 1.0),
    ("\\boxed{2x+1}", "1+2x", 1.0),
    ("\\boxed{3\\sqrt{3}}", "\\sqrt{27}", 1.0),
    ("\\boxed{(1,2)}", "(2,1)", 0.0),
    # nested braces, last box wins, missing box
    ("\\boxed{\\frac{1}{\\sqrt{4}}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{2} no wait \\boxed{3}", "3", 1.0),
    ("\\boxed{3} no wait \\boxed{2}", "3", 0.0),
    ("the answer is 3", "3", 0.0),
    ("no box", "None", 0.0),                                 # mathruler alone would say 1 ("None" == "None")
    ("\\boxed{3", "3", 0.0),
    ("\\boxed{5}", "\\boxed{5}", 1.0),                       # a boxed ground truth is unwrapped
])
def test_mathruler_cases(mathruler, response, gt, expected):
    assert accuracy(mathruler, response, gt) == expected


def test_unknown_grader_is_named():
    with pytest.raises(ValueError, match="unknown reward.grader 'sympy'"):
        load_grader("sympy")
