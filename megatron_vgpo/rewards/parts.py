r"""Per-part grading of multi-part answers (the synthetic multi-part counting task, ``data/synthetic.py``).

A multi-part row names its parts in order and stores their counts (``parts``: JSON
``[{"name": "red circles", "count": 2}, ...]``); the expected response reads them one by one::

    <think> red circles 2. blue squares 1. green triangles 3. </think> \boxed{6}

The reward grades the total (the last ``\boxed{}``); with ``reward.parts_must_sum`` it also needs the
total to be the sum of the reads (``sums_its_parts``), so that a policy cannot answer apart from its
reads (without it, RL on the total alone let the tiny policy's reads decay into noise while it boxed
the most frequent total: README, "Multi-part counting"). This module grades each part, so validation
can report the accuracy of a part by its POSITION in the problem's order (first part ... last part):
when a policy stops looking at the image late in its response, the late positions fall first.

Reading a response: its think part (up to ``</think>``, else up to the first ``\boxed``, else all of
it) is scanned left to right for each part in the problem's order: the part's name (case-insensitive,
any run of whitespace between its words, the plural ``s`` optional) followed, after any spaces or
punctuation but no word, by an integer. A part's search starts after the previous part's match, so
parts written out of order are missed; a missing part, or one without a number, is wrong.

The format warm-up uses ``structured_target``: the same layout with a random count in every slot and
their sum in the box, so the policy learns the structure (and that the answer is the sum of the
reads) but nothing about which count goes with which image.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

from megatron_vgpo.rewards.extract import BOXED, THINK_CLOSE, last_boxed


@dataclass(frozen=True)
class Part:
    name: str
    """How the problem and the response name it, e.g. "red circles"."""
    count: int
    """Its true count."""


PartsLike = Union[str, Sequence[Union[Part, dict]]]
"""A row's ``parts`` column (JSON text) or its parsed form."""


def parse_parts(value: PartsLike) -> list[Part]:
    """``Part``s from a row's ``parts`` column: JSON text, a list of ``{"name", "count"}`` dicts, or
    ``Part``s."""
    items = json.loads(value) if isinstance(value, str) else value
    return [p if isinstance(p, Part) else Part(str(p["name"]), int(p["count"])) for p in items]


def think_part(response: str) -> str:
    r"""The reasoning of a response: up to ``</think>``, else up to the first ``\boxed``, else all."""
    for marker in (THINK_CLOSE, BOXED):
        end = response.find(marker)
        if end != -1:
            return response[:end]
    return response


def _name_pattern(name: str) -> str:
    words = [re.escape(w) for w in name.split()]
    if words and words[-1].endswith("s"):
        words[-1] += "?"  # "red circle 1." reads as well as "red circles 1."
    return r"(?<!\w)" + r"\s+".join(words) + r"(?![^\W\d])[^\w]*(\d+)(?!\d)"


def read_parts(response: str, names: Sequence[str]) -> list[Optional[int]]:
    """The count the response's think part gives for each name, in order; None where it gives none."""
    text, start, out = think_part(response), 0, []
    for name in names:
        match = re.compile(_name_pattern(name), re.IGNORECASE).search(text, start)
        out.append(int(match.group(1)) if match else None)
        start = match.end() if match else start
    return out


def grade_parts(response: str, parts: PartsLike) -> list[bool]:
    """Per position of the problem's order: does the response give that part's true count?"""
    parts = parse_parts(parts)
    return [read == p.count for read, p in zip(read_parts(response, [p.name for p in parts]), parts)]


def sums_its_parts(response: str, parts: PartsLike) -> bool:
    r"""Whether the ``\boxed{}`` answer is the sum of the counts the response read (right or wrong):
    separates wrong reads from wrong arithmetic."""
    reads = read_parts(response, [p.name for p in parse_parts(parts)])
    answer = last_boxed(response)
    return None not in reads and answer is not None and answer == str(sum(reads))


def structured_response(names: Sequence[str], counts: Sequence[int]) -> str:
    r"""``<think> red circles 2. blue squares 1. </think> \boxed{3}``: one read per part, then the sum."""
    reads = " ".join(f"{name} {count}." for name, count in zip(names, counts))
    return f"<think> {reads} </think> \\boxed{{{sum(counts)}}}"


def structured_target(row_parts: PartsLike, rng: random.Random, counts: Sequence[int] = range(4)) -> str:
    """The format warm-up's target for a multi-part row: its part names in its order, each with a
    count drawn uniformly from ``counts`` independently of the image, and their sum as the answer."""
    names = [p.name for p in parse_parts(row_parts)]
    return structured_response(names, [rng.choice(list(counts)) for _ in names])


def count_values(batch_parts: Iterable[PartsLike]) -> list[int]:
    """The distinct part counts of a batch of rows, sorted: ``structured_target``'s ``counts`` (the
    count vocabulary, as the plain warm-up draws from the batch's answers)."""
    return sorted({p.count for parts in batch_parts for p in parse_parts(parts)})


def part_accuracy(results: Iterable[tuple[str, Sequence[bool]]], prefix: str = "val/part_accuracy") -> dict[str, float]:
    """``{prefix}/<dataset>/<position>``: the mean correctness of each part position (1-based) over a
    dataset's rows, from ``(dataset name, grade_parts(...))`` pairs; rows with fewer parts add to
    the positions they have."""
    hits: dict[tuple[str, int], list[bool]] = defaultdict(list)
    for dataset, verdicts in results:
        for position, correct in enumerate(verdicts, 1):
            hits[(dataset, position)].append(bool(correct))
    return {f"{prefix}/{dataset}/{position}": sum(v) / len(v) for (dataset, position), v in sorted(hits.items())}


def position_accuracy(responses: Sequence[str], row_parts: Sequence[PartsLike]) -> list[float]:
    """The accuracy of each part position (index 0 = first part) over one dataset's responses, the
    ``i``-th response graded against ``row_parts[i]``."""
    verdicts = [grade_parts(r, p) for r, p in zip(responses, row_parts, strict=True)]
    metrics = part_accuracy(("", v) for v in verdicts)
    return [metrics[f"val/part_accuracy//{i}"] for i in range(1, len(metrics) + 1)]
