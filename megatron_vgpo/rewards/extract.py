r"""Pure string functions of a response: the last ``\boxed{}`` answer and the format reward.

``last_boxed`` follows mathruler's ``extract_boxed_content`` (the paper's code): the answer starts at
the LAST ``\boxed{`` and runs to its matching brace (nested braces allowed). One difference, to
avoid a false positive: no ``\boxed`` (or an unclosed last one, e.g. a response cut at the length
limit) gives ``None``, which scores 0, instead of mathruler's string ``"None"`` (which grades as
correct against a ground truth "None").

The format reward (used when ``reward.format_weight > 0``) is 1.0 exactly when all of:
  1. the response, leading whitespace stripped, starts with ``<think>``;
  2. it contains exactly one ``<think>`` and exactly one ``</think>``;
  3. after ``</think>``, the last ``\boxed{`` is closed and its content is not blank;
and 0.0 otherwise. (EasyR1's regex ``<think>.*</think>.*\\boxed\{.*\}.*`` also accepts repeated or
unbalanced tags and an unclosed box; this is stricter, and linear time.)
"""

from __future__ import annotations

from typing import Optional

BOXED = "\\boxed{"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def _closing_brace(text: str, start: int) -> int:
    """Index of the brace closing the group whose content starts at ``start``, or -1."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return i
            depth -= 1
    return -1


def last_boxed(text: str) -> Optional[str]:
    r"""Content of the last ``\boxed{...}`` (stripped), or None if there is none or it is unclosed."""
    start = text.rfind(BOXED)
    if start == -1:
        return None
    end = _closing_brace(text, start + len(BOXED))
    return None if end == -1 else text[start + len(BOXED):end].strip()


def unwrap_ground_truth(answer: str) -> str:
    r"""A ground truth that is one whole ``\boxed{X}`` (as in some datasets) becomes ``X``."""
    answer = answer.strip()
    if answer.startswith(BOXED) and _closing_brace(answer, len(BOXED)) == len(answer) - 1:
        return answer[len(BOXED):-1].strip()
    return answer


def format_reward(response: str) -> float:
    """1.0 iff ``<think>...</think>`` opens the response and a non-empty ``\\boxed{}`` follows it."""
    text = response.lstrip()
    if not text.startswith(THINK_OPEN):
        return 0.0
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return 0.0
    tail = text.split(THINK_CLOSE, 1)[1]
    answer = last_boxed(tail)
    return 1.0 if answer else 0.0
