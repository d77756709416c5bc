"""Generated, verifiable, visual-dependent tasks for CPU runs: counting objects by colour AND shape.

Each image is a white square split into a grid of ``cell``-pixel cells (14 = the vision patch size,
so each object is exactly one patch and a 56x56 image is 4 merged image tokens; 28-pixel cells put
one object in each merged token). Every cell holds at most one object.

The counting task (``SyntheticOptions``): some cells hold a target (e.g. a red circle), some hold
distractors sharing exactly one attribute with it (blue circles, red squares), the rest are empty.
The question names the target; the answer is its count.

- Answers are exactly uniform over ``min_count..max_count`` (K values) in every split whose size is a
  multiple of K, so chance accuracy is known: 1/K (the blank-image control must fall to it).
- The distractor count is drawn independently of the answer: counting all objects, or all red
  things, or all circles, does not solve the task; only the conjunction does.

The multi-part counting task (``MulticountOptions``): the image holds several kinds of objects (red
circles, blue squares, green triangles, ...); the question names ``parts`` kinds, in a fixed order (or
one drawn per row: ``shuffle_parts``), and asks for their total. The answer needs one read of the image
per part, written one after the other (``<think> red circles 2. blue squares 1. green triangles 3.
</think> \\boxed{6}``, ``rewards/parts.py``), so a policy that stops looking at the image late in its
response gets the late parts wrong: the task where visual forgetting can happen. Each part position's
count is exactly uniform over ``min_count..max_count`` when K divides the split size; the per-part
counts are stored in the row (``parts``: JSON ``[{"name": "red circles", "count": 2}, ...]``, in the
problem's order). Optional distractors are kinds the question does not name. The defaults (3 parts, each
0 or 1, a 56-pixel image of 2 x 2 cells, fixed order) are the setting where the tiny CPU policy learns
the total within 200 RL steps with ``reward.parts_must_sum`` (DAPO and VGPO, 3 seeds each: 48-100%
against 40.6% by a constant answer; README, "Multi-part counting"); counts up to 2, random
order or a 84-pixel image did not leave chance in 200 steps, and more parts or distractors are harder
still.

Both tasks:
- ``val_blank``: the val rows (same questions and answers) with blank images.
- Optional claims about each image (``claims`` = C > 0, for VAPO): columns ``claim_1..claim_C`` and
  ``label_1..label_C`` ("CORRECT"/"WRONG"), C // 2 true and the rest false in a random order, about
  exact counts of a kind ("There are 2 red circles."), the number of objects, the presence or
  absence of a colour ("There is a blue object."), of a shape ("There is no triangle.") and of a
  kind ("There is a green square."), in the task's colours and shapes; computed from the drawn objects,
  so every label is correct by construction. The blank rows get claims about an empty image.
- Deterministic per seed (string-seeded ``random.Random``; images PNG-encoded, lossless). Claims use
  their own per-row generator: adding them leaves the images and answers unchanged.
- Rows follow the EasyR1/verl schema: ``problem`` (``<image>`` + question), ``answer`` (a string),
  ``images`` (a list of ``{"bytes", "path"}`` structs, the Hugging Face Image feature layout), plus
  ``objects`` (for tests and debugging).
The CLI is ``tools/make_synthetic_dataset.py``.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from PIL import Image, ImageDraw

COLORS = {"red": (230, 30, 30), "blue": (30, 60, 230), "green": (20, 150, 40)}
SHAPES = ("circle", "square", "triangle")
COUNT_COLORS, COUNT_SHAPES = ("red", "blue"), ("circle", "square")
"""The counting task's palette."""
PART_KINDS = tuple((c, s) for k in range(3) for c, s in zip(COLORS, SHAPES[k:] + SHAPES[:k]))
"""The multi-part task's kinds in the order parts are taken: red circles, blue squares, green
triangles (no shared colour or shape), then the six mixed kinds."""
BACKGROUND = (255, 255, 255)
QUESTION = "<image>How many {color} {shape}s are in the image?"
MULTI_QUESTION = "<image>Count the {names}. Answer their total."
SPLITS = ("train", "val", "val_blank")
LABELS = {True: "CORRECT", False: "WRONG"}


@dataclass(frozen=True)
class SyntheticOptions:
    """The counting task."""

    size: int = 56
    """Image side in pixels; a multiple of 28 (patch 14 x merge 2), so no resize ever happens."""
    cell: int = 14
    """Grid cell side in pixels; one object per cell."""
    min_count: int = 0
    """Smallest answer."""
    max_count: int = 3
    """Largest answer; K = max_count - min_count + 1 answers, chance = 1/K."""
    max_distractors: int = 4
    """Distractors per image are drawn uniformly from 0..max_distractors."""
    all_targets: bool = False
    """Ask about any colour x shape (4 question variants) instead of only red circles."""
    claims: int = 0
    """Claims about each image per row (``claim_i``/``label_i`` columns, for VAPO); 0: none."""

    def validate(self) -> None:
        _validate_grid(self.size, self.cell, self.min_count, self.max_count, self.claims)
        if self.max_count + self.max_distractors > (self.size // self.cell) ** 2:
            raise ValueError(f"{self.max_count} targets + {self.max_distractors} distractors do not fit in "
                             f"{(self.size // self.cell) ** 2} cells")

    @property
    def num_answers(self) -> int:
        return self.max_count - self.min_count + 1

    @property
    def kinds(self) -> tuple[tuple[str, str], ...]:
        """The (colour, shape) kinds an image can hold; the claims talk about these."""
        if self.all_targets:
            return tuple((c, s) for c in COUNT_COLORS for s in COUNT_SHAPES)
        return (("red", "circle"),) + ((("blue", "circle"), ("red", "square")) if self.max_distractors else ())

    @property
    def max_objects(self) -> int:
        return self.max_count + self.max_distractors


@dataclass(frozen=True)
class MulticountOptions:
    """The multi-part counting task: count several kinds in turn, answer the total."""

    size: int = 56
    """Image side in pixels; a multiple of 28."""
    cell: int = 28
    """Grid cell side in pixels; one object per cell (28: one object per merged image token)."""
    parts: int = 3
    """Kinds counted per row, the first ``parts`` of ``PART_KINDS`` (1..9)."""
    min_count: int = 0
    """Smallest count of a part."""
    max_count: int = 1
    """Largest count of a part; the total is in parts * min_count .. parts * max_count."""
    max_distractors: int = 0
    """Objects of kinds not asked about, drawn uniformly from 0..max_distractors per image."""
    shuffle_parts: bool = False
    """Name the parts in an order drawn per row (else always in ``PART_KINDS`` order)."""
    claims: int = 0
    """Claims about each image per row (``claim_i``/``label_i`` columns, for VAPO); 0: none."""

    def validate(self) -> None:
        _validate_grid(self.size, self.cell, self.min_count, self.max_count, self.claims)
        if not 1 <= self.parts <= len(PART_KINDS):
            raise ValueError(f"parts must be in 1..{len(PART_KINDS)}, got {self.parts}")
        if self.max_distractors and self.parts == len(PART_KINDS):
            raise ValueError("distractors need a kind that is not a part: parts must be < 9")
        if self.max_objects > (self.size // self.cell) ** 2:
            raise ValueError(f"{self.parts} parts of up to {self.max_count} + {self.max_distractors} distractors "
                             f"do not fit in {(self.size // self.cell) ** 2} cells")

    @property
    def num_counts(self) -> int:
        """K: the values a part's count takes; a part's chance accuracy is 1/K."""
        return self.max_count - self.min_count + 1

    @property
    def kinds(self) -> tuple[tuple[str, str], ...]:
        """The (colour, shape) kinds an image can hold; the claims talk about these."""
        return PART_KINDS if self.max_distractors else PART_KINDS[:self.parts]

    @property
    def max_objects(self) -> int:
        return self.parts * self.max_count + self.max_distractors


TaskOptions = Union[SyntheticOptions, MulticountOptions]


def _validate_grid(size: int, cell: int, min_count: int, max_count: int, claims: int) -> None:
    if size < 56 or size % 28:
        raise ValueError(f"size must be a multiple of 28 and >= 56, got {size}")
    if cell < 6 or size % cell:
        raise ValueError(f"cell must be >= 6 and divide size {size}, got {cell}")
    if not 0 <= min_count <= max_count:
        raise ValueError(f"need 0 <= min_count <= max_count, got {min_count}..{max_count}")
    if claims < 0:
        raise ValueError(f"claims must be >= 0, got {claims}")


def part_name(color: str, shape: str) -> str:
    """How a kind is named in questions, responses and ``parts``: "red circles"."""
    return f"{color} {shape}s"


def _distractor(target: tuple[str, str], rng: random.Random) -> tuple[str, str]:
    """An object sharing exactly one attribute with the target (counting task)."""
    color, shape = target
    if rng.random() < 0.5:
        return next(c for c in COUNT_COLORS if c != color), shape
    return color, next(s for s in COUNT_SHAPES if s != shape)


def draw_scene(objects: list[tuple[str, str, int]], opts: TaskOptions) -> Image.Image:
    """Objects ``(color, shape, cell index)`` drawn without anti-aliasing (pure colours), each inset by
    2 px in its cell: squares fill their box, circles about 78% of it, triangles (apex up) half."""
    image = Image.new("RGB", (opts.size, opts.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    grid = opts.size // opts.cell
    for color, shape, index in objects:
        x0, y0 = (index % grid) * opts.cell + 2, (index // grid) * opts.cell + 2
        x1, y1 = x0 + opts.cell - 5, y0 + opts.cell - 5
        if shape == "triangle":
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=COLORS[color])
        else:
            (draw.ellipse if shape == "circle" else draw.rectangle)((x0, y0, x1, y1), fill=COLORS[color])
    return image


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _row(problem: str, answer: int, objects: list[tuple[str, str, int]], opts: TaskOptions) -> dict:
    return {"problem": problem, "answer": str(answer),
            "images": [{"bytes": _png(draw_scene(objects, opts)), "path": None}],
            "objects": [f"{c} {s} @{i}" for c, s, i in objects]}


def make_rows(n: int, seed: int, split: str, opts: TaskOptions) -> list[dict]:
    """``n`` rows of a split of either task (the type of ``opts`` chooses), claims included when
    ``opts.claims``. Counting: answers cycle through the K values before shuffling (exactly uniform
    when K divides n)."""
    opts.validate()
    if isinstance(opts, MulticountOptions):
        rows = _multicount_rows(n, seed, split, opts)
    else:
        rows = _counting_rows(n, seed, split, opts)
    return [_with_claims(row, i, seed, split, opts) for i, row in enumerate(rows)]


def _counting_rows(n: int, seed: int, split: str, opts: SyntheticOptions) -> list[dict]:
    rng = random.Random(f"megatron_vgpo-synthetic/{seed}/{split}")
    counts = [opts.min_count + i % opts.num_answers for i in range(n)]
    rng.shuffle(counts)
    targets = [(c, s) for c in COUNT_COLORS for s in COUNT_SHAPES] if opts.all_targets else [("red", "circle")]
    cells = (opts.size // opts.cell) ** 2
    rows = []
    for count in counts:
        target = rng.choice(targets)
        kinds = [target] * count + [_distractor(target, rng) for _ in range(rng.randint(0, opts.max_distractors))]
        objects = [(c, s, i) for (c, s), i in zip(kinds, rng.sample(range(cells), len(kinds)))]
        rows.append(_row(QUESTION.format(color=target[0], shape=target[1]), count, objects, opts))
    return rows


def _multicount_rows(n: int, seed: int, split: str, opts: MulticountOptions) -> list[dict]:
    """Each part POSITION's counts cycle through the K values and are shuffled independently, so
    every position (first part, second, ...) sees every count equally often."""
    rng = random.Random(f"megatron_vgpo-synthetic-multicount/{seed}/{split}")
    columns = []
    for _ in range(opts.parts):
        column = [opts.min_count + i % opts.num_counts for i in range(n)]
        rng.shuffle(column)
        columns.append(column)
    kinds, others = list(PART_KINDS[:opts.parts]), PART_KINDS[opts.parts:]
    cells = (opts.size // opts.cell) ** 2
    rows = []
    for counts in zip(*columns):
        order = rng.sample(kinds, len(kinds)) if opts.shuffle_parts else kinds
        drawn = [k for k, c in zip(order, counts) for _ in range(c)]
        drawn += [rng.choice(others) for _ in range(rng.randint(0, opts.max_distractors))]
        objects = [(c, s, i) for (c, s), i in zip(drawn, rng.sample(range(cells), len(drawn)))]
        names = [part_name(*k) for k in order]
        row = _row(MULTI_QUESTION.format(names=", then the ".join(names)), sum(counts), objects, opts)
        row["parts"] = json.dumps([{"name": name, "count": c} for name, c in zip(names, counts)])
        rows.append(row)
    return rows


def blank_rows(rows: list[dict], opts: TaskOptions, seed: int = 0) -> list[dict]:
    """The same rows with blank images (no objects): accuracy on them measures guessing. With
    ``opts.claims`` each row's claims are drawn anew about the empty image (split ``val_blank``)."""
    blank = _png(draw_scene([], opts))
    return [_with_claims(dict(r, images=[{"bytes": blank, "path": None}], objects=[]), i, seed, "val_blank", opts)
            for i, r in enumerate(rows)]


# ---------------------------------------------------------------------------------------- claims


def _count_claim(color: str, shape: str, n: int) -> str:
    return f"There is 1 {color} {shape}." if n == 1 else f"There are {n} {color} {shape}s."


def claim_pools(objects: list[tuple[str, str]], opts: TaskOptions) -> dict[bool, dict[str, list[str]]]:
    """Every claim about a scene of ``(colour, shape)`` objects, ``{truth: {family: [claims]}}``.
    Families: ``count`` (the exact count of a kind, 0 up to the most a kind can have), ``total`` (the
    number of objects), ``color``, ``shape`` and ``kind`` (presence or absence), over the kinds the
    task can draw (``opts.kinds``: no claim is true or false whatever the image). Each claim's truth
    is computed from ``objects``."""
    kinds = Counter(objects)
    colors = list(dict.fromkeys(c for c, _ in opts.kinds))
    shapes = list(dict.fromkeys(s for _, s in opts.kinds))
    per_kind = max(opts.max_count, opts.max_distractors)
    pools: dict[bool, dict[str, list[str]]] = {True: {}, False: {}}

    def add(family: str, claim: str, truth: bool) -> None:
        pools[truth].setdefault(family, []).append(claim)

    for color, shape in opts.kinds:
        k = kinds[(color, shape)]
        for n in range(per_kind + 1):
            add("count", _count_claim(color, shape, n), n == k)
        add("kind", f"There is a {color} {shape}.", k > 0)
        add("kind", f"There is no {color} {shape}.", k == 0)
    for n in range(opts.max_objects + 1):
        add("total", "There is 1 object." if n == 1 else f"There are {n} objects.", n == len(objects))
    for color in colors:
        present = any(c == color for c, _ in objects)
        add("color", f"There is a {color} object.", present)
        add("color", f"There is no {color} object.", not present)
    for shape in shapes:
        present = any(s == shape for _, s in objects)
        add("shape", f"There is a {shape}.", present)
        add("shape", f"There is no {shape}.", not present)
    return pools


def scene_claims(objects: list[tuple[str, str]], n: int, rng: random.Random,
                 opts: TaskOptions) -> list[tuple[str, bool]]:
    """``n`` (claim, truth) pairs: ``n // 2`` true and the rest false, in a random order. Each claim
    picks a family uniformly among those that still have an unused claim of its truth, then a claim
    of it: distinct claims while the pools last (then repeats)."""
    pools = claim_pools(objects, opts)
    left = {truth: {f: list(c) for f, c in fams.items()} for truth, fams in pools.items()}
    truths = [True] * (n // 2) + [False] * (n - n // 2)
    rng.shuffle(truths)
    out = []
    for truth in truths:
        if not any(left[truth].values()):
            left[truth] = {f: list(c) for f, c in pools[truth].items()}
        family = rng.choice(sorted(f for f, c in left[truth].items() if c))
        claims = left[truth][family]
        out.append((claims.pop(rng.randrange(len(claims))), truth))
    return out


def _with_claims(row: dict, index: int, seed: int, split: str, opts: TaskOptions) -> dict:
    if not opts.claims:
        return row
    rng = random.Random(f"megatron_vgpo-synthetic-claims/{seed}/{split}/{index}")
    objects = [tuple(o.split(" ")[:2]) for o in row["objects"]]  # "red circle @5" -> (red, circle)
    row = dict(row)
    for i, (claim, truth) in enumerate(scene_claims(objects, opts.claims, rng, opts), 1):
        row[f"claim_{i}"], row[f"label_{i}"] = claim, LABELS[truth]
    return row


# ------------------------------------------------------------------------------------------- files


def write_parquet(rows: list[dict], path: Path) -> None:
    """Rows as parquet; ``parts`` and the claim columns are written when the first row has them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [
        ("problem", pa.string()), ("answer", pa.string()),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("objects", pa.list_(pa.string())),
    ]
    first = rows[0] if rows else {}
    fields += [("parts", pa.string())] if "parts" in first else []
    claims = sum(1 for key in first if key.startswith("claim_"))
    fields += [(f"{kind}_{i}", pa.string()) for i in range(1, claims + 1) for kind in ("claim", "label")]
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(fields)), path)


def write_synthetic_dataset(output: str | Path, train: int, val: int, seed: int,
                            opts: TaskOptions = SyntheticOptions()) -> dict[str, Path]:
    """Write ``train.parquet``, ``val.parquet`` and ``val_blank.parquet`` into ``output``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    val_rows = make_rows(val, seed, "val", opts)
    splits = {"train": make_rows(train, seed, "train", opts), "val": val_rows,
              "val_blank": blank_rows(val_rows, opts, seed)}
    paths = {}
    for name, rows in splits.items():
        paths[name] = out / f"{name}.parquet"
        write_parquet(rows, paths[name])
    return paths
