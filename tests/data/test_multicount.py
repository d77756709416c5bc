"""The multi-part counting task (the one where visual forgetting can happen) and its per-part grading:
the generator against its contract (deterministic per seed, balanced counts per position, labels
correct by construction - read back from the PIXELS, not from the generator's bookkeeping -, the
blank control), the grader on hand cases, the warm-up's structured target, and the CLI."""

from __future__ import annotations

import io
import json
import random
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from megatron_vgpo.data.synthetic import COLORS, MulticountOptions, blank_rows, make_rows
from megatron_vgpo.rewards.parts import (count_values, grade_parts, parse_parts, part_accuracy, position_accuracy,
                                         read_parts, structured_response, structured_target, sums_its_parts)


def _pixels(row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB"))


def _count_by_color(image: np.ndarray, cell: int) -> Counter:
    """Objects per colour read from the image: one object per cell, coloured by its majority
    non-white colour (the colours are far apart)."""
    out = Counter()
    n = image.shape[0] // cell
    for r in range(n):
        for c in range(n):
            block = image[r * cell:(r + 1) * cell, c * cell:(c + 1) * cell].reshape(-1, 3).astype(int)
            for name, rgb in COLORS.items():
                if (np.abs(block - np.array(rgb)).sum(-1) < 60).sum() > 10:
                    out[name] += 1
    return out


HARDER = MulticountOptions(size=84, max_count=2, shuffle_parts=True)
"""Counts 0..2 in 3 x 3 cells, the order drawn per row (not learned in 200 CPU steps: README)."""


@pytest.mark.parametrize("opts, per_count, orders", [
    (MulticountOptions(), 30, 1),  # the defaults: 3 parts, counts 0..1, the same order in every row
    (HARDER, 20, 6),  # the order drawn per row: all 3! orders
])
def test_deterministic_per_seed_and_balanced_per_position(opts, per_count, orders):
    a, b = make_rows(60, 0, "train", opts), make_rows(60, 0, "train", opts)
    assert a == b and make_rows(60, 1, "train", opts) != a
    for position in range(3):
        counts = Counter(json.loads(r["parts"])[position]["count"] for r in a)
        assert counts == {k: per_count for k in range(opts.max_count + 1)}
    assert len(Counter(tuple(p["name"] for p in json.loads(r["parts"])) for r in a)) == orders


@pytest.mark.parametrize("opts", [MulticountOptions(), HARDER])
def test_labels_are_correct_by_construction_read_from_the_pixels(opts):
    """With the default kinds (red circles, blue squares, green triangles: one colour each), the count
    of a part is the number of cells of its colour in the image; the answer is their sum."""
    for row in make_rows(30, 3, "val", opts):
        parts = parse_parts(row["parts"])
        by_color = _count_by_color(_pixels(row), opts.cell)
        assert {p.name.split()[0]: p.count for p in parts} == {c: by_color[c] for c in COLORS}
        assert int(row["answer"]) == sum(p.count for p in parts)
        names = re.findall(r"the (\w+ \w+)", row["problem"])
        assert names == [p.name for p in parts]  # the problem names the parts in the stored order


def test_blank_control_keeps_questions_and_answers_with_no_objects():
    opts = MulticountOptions()
    rows = make_rows(12, 0, "val", opts)
    blank = blank_rows(rows, opts)
    assert [(r["problem"], r["answer"], r["parts"]) for r in blank] == [(r["problem"], r["answer"], r["parts"]) for r in rows]
    for r in blank:
        assert sum(_count_by_color(_pixels(r), opts.cell).values()) == 0 and r["objects"] == []


def test_harder_setting_by_option():
    opts = MulticountOptions(parts=5, max_count=3, max_distractors=2, size=140)
    rows = make_rows(40, 0, "train", opts)
    assert all(len(parse_parts(r["parts"])) == 5 for r in rows)
    assert any(len(r["objects"]) > sum(p.count for p in parse_parts(r["parts"])) for r in rows)  # distractors
    with pytest.raises(ValueError, match="parts"):
        make_rows(4, 0, "train", MulticountOptions(parts=10))


PARTS = [{"name": "red circles", "count": 2}, {"name": "blue squares", "count": 1},
         {"name": "green triangles", "count": 0}]


@pytest.mark.parametrize("response, expected", [
    ("<think> red circles 2. blue squares 1. green triangles 0. </think> \\boxed{3}", [True, True, True]),
    ("<think> red circles 2. blue squares 2. green triangles 0. </think> \\boxed{4}", [True, False, True]),
    ("<think> Red Circle: 2, blue  squares 1 green triangles 3 </think> \\boxed{6}", [True, True, False]),
    # out of order: red circles is found after blue squares, whose search then starts past it
    ("<think> blue squares 1. red circles 2. green triangles 0. </think> \\boxed{3}", [True, False, True]),
    ("<think> red circles 2. </think> \\boxed{2}", [True, False, False]),
    ("<think> red circles two. blue squares 1. </think>", [False, True, False]),
    ("red circles 2. blue squares 1. green triangles 0. \\boxed{3} green triangles 5", [True, True, True]),
    ("<think> red circles 21. blue squares 1. green triangles 0.</think>", [False, True, True]),
])
def test_per_part_grading_on_hand_cases(response, expected):
    assert grade_parts(response, json.dumps(PARTS)) == expected


def test_reads_sums_and_position_accuracy_by_hand():
    assert read_parts("<think> red circles 2. blue squares 5. </think>", ["red circles", "blue squares"]) == [2, 5]
    assert sums_its_parts("<think> red circles 2. blue squares 2. green triangles 0. </think> \\boxed{4}", PARTS)
    assert not sums_its_parts("<think> red circles 2. blue squares 2. green triangles 0. </think> \\boxed{3}", PARTS)
    responses = ["<think> red circles 2. blue squares 1. green triangles 1. </think>",
                 "<think> red circles 2. blue squares 0. green triangles 0. </think>",
                 "<think> red circles 1. blue squares 1. green triangles 1. </think>",
                 "<think> red circles 2. blue squares 1. green triangles 2. </think>"]
    assert position_accuracy(responses, [PARTS] * 4) == [0.75, 0.75, 0.25]
    metrics = part_accuracy([("val", [True, False]), ("val", [True, True]), ("val_blank", [False, False])])
    assert metrics == {"val/part_accuracy/val/1": 1.0, "val/part_accuracy/val/2": 0.5,
                       "val/part_accuracy/val_blank/1": 0.0, "val/part_accuracy/val_blank/2": 0.0}


def test_structured_warmup_target_has_the_layout_and_no_task_knowledge():
    rows = make_rows(300, 0, "train", HARDER)
    counts = count_values(r["parts"] for r in rows)
    assert counts == [0, 1, 2]
    rng = random.Random(0)
    targets = [structured_target(r["parts"], rng, counts) for r in rows]
    names = [[p.name for p in parse_parts(r["parts"])] for r in rows]
    assert targets[0] == structured_response(names[0], read_parts(targets[0], names[0]))
    reads = [read_parts(t, n) for t, n in zip(targets, names)]
    truth = [[p.count for p in parse_parts(r["parts"])] for r in rows]
    agree = sum(a == b for rr, tt in zip(reads, truth) for a, b in zip(rr, tt)) / (3 * len(rows))
    assert abs(agree - 1 / 3) < 0.06  # the slots are random: right one time in three, as chance
    assert all(sums_its_parts(t, r["parts"]) for t, r in zip(targets, rows))  # the box is the sum of the reads


def test_cli_writes_the_task(tmp_path):
    import pyarrow.parquet as pq

    from tools.make_synthetic_dataset import main

    assert main(["--output", str(tmp_path), "--task", "multicount", "--train", "12", "--val", "6", "--claims", "4"]) == 0
    table = pq.read_table(tmp_path / "train.parquet").to_pylist()
    assert len(table) == 12 and all(len(parse_parts(r["parts"])) == 3 and r["claim_4"] for r in table)
    assert main(["--output", str(tmp_path / "x"), "--task", "count", "--parts", "3"]) == 2  # not a count option


def test_cli_order_flags():
    from tools.make_synthetic_dataset import parse_args, task_options

    def shuffled(*flags):
        return task_options(parse_args(["--output", "x", "--task", "multicount", *flags])).shuffle_parts

    assert (shuffled(), shuffled("--random-order"), shuffled("--fixed-order")) == (False, True, False)
    with pytest.raises(SystemExit):  # one or the other
        parse_args(["--output", "x", "--task", "multicount", "--random-order", "--fixed-order"])
