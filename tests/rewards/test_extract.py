r"""Last-\boxed extraction, ground-truth unwrapping and the format reward."""

import pytest
from mathruler.grader import extract_boxed_content

from megatron_vgpo.rewards.extract import format_reward, last_boxed, unwrap_ground_truth


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{3}.", "3"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{ \\{1, \\{2\\}\\} }", "\\{1, \\{2\\}\\}"),
    ("\\boxed{a_{b_{c}}} tail } }", "a_{b_{c}}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),             # the last one wins
    ("\\boxed{1} then \\boxed{2", None),                   # an unclosed last box: no answer
    ("no box at all", None),
    ("\\boxed{}", ""),
    ("\\fbox{3}", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected
    if expected is not None:  # same answer as the paper's extractor where one exists
        assert extract_boxed_content(text) == expected


def test_mathruler_none_string_is_not_an_answer():
    assert extract_boxed_content("no box") == "None"  # mathruler's sentinel, gradeable as "None"
    assert last_boxed("no box") is None


@pytest.mark.parametrize("gt,expected", [
    ("\\boxed{5}", "5"), (" 5 ", "5"), ("\\boxed{1}+\\boxed{2}", "\\boxed{1}+\\boxed{2}"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}")])
def test_unwrap_ground_truth(gt, expected):
    assert unwrap_ground_truth(gt) == expected


@pytest.mark.parametrize("response,expected", [
    ("<think>count them</think> The answer is \\boxed{3}.", 1.0),
    ("  \n<think>\n...\n</think>\n\\boxed{x^{2}}", 1.0),
    ("<think></think>\\boxed{3}", 1.0),
    ("The answer is \\boxed{3}.", 0.0),                                # no think block
    ("intro <think>a</think> \\boxed{3}", 0.0),                          # think does not open the response
    ("<think>a</think><think>b</think> \\boxed{3}", 0.0),                # two think blocks
    ("<think>a \\boxed{3}", 0.0),                                        # unclosed think
    ("<think>a \\boxed{3} </think> so 3", 0.0),                          # box only inside the thinking
    ("<think>a</think> \\boxed{3", 0.0),                                 # unclosed box
    ("<think>a</think> \\boxed{ }", 0.0),                                # blank box
])
def test_format_reward(response, expected):
    assert format_reward(response) == expected
