"""A generated, verifiable, visual-dependent task for CPU runs: count the objects of one colour AND shape.

Each image is a white square split into a grid of ``cell``-pixel cells (14 = the vision patch size,
so each object is exactly one patch and a 56x56 image is 4 merged image tokens). Some cells hold a
target (e.g. a red circle), some hold distractors sharing exactly one attribute with it (blue
circles, red squares), the rest are empty. The question names the target; the answer is its count.

- Answers are exactly uniform over ``min_count..max_count`` (K values) in every split whose size is a
  multiple of K, so chance accuracy is known: 1/K (the blank-image control must fall to it).
- The distractor count is drawn independently of the answer: counting all objects, or all red
  things, or all circles, does not solve the task; only the conjunction does.
- ``val_blank``: the val rows (same questions and answers) with blank images.
- Deterministic per seed (string-seeded ``random.Random``; images PNG-encoded, lossless).
- Rows follow the EasyR1/verl schema: ``problem`` (``<image>`` + question), ``answer`` (a string),
  ``images`` (a list of ``{"bytes", "path"}`` structs, the Hugging Face Image feature layout).
The CLI is ``tools/make_synthetic_dataset.py``.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (230, 30, 30), "blue": (30, 60, 230)}
SHAPES = ("circle", "square")
BACKGROUND = (255, 255, 255)
QUESTION = "<image>How many {color} {shape}s are in the image?"
SPLITS = ("train", "val", "val_blank")


@dataclass(frozen=True)
class SyntheticOptions:
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

    def validate(self) -> None:
        if self.size < 56 or self.size % 28:
            raise ValueError(f"size must be a multiple of 28 and >= 56, got {self.size}")
        if self.cell < 6 or self.size % self.cell:
            raise ValueError(f"cell must be >= 6 and divide size {self.size}, got {self.cell}")
        if not 0 <= self.min_count <= self.max_count:
            raise ValueError(f"need 0 <= min_count <= max_count, got {self.min_count}..{self.max_count}")
        if self.max_count + self.max_distractors > (self.size // self.cell) ** 2:
            raise ValueError(f"{self.max_count} targets + {self.max_distractors} distractors do not fit in "
                             f"{(self.size // self.cell) ** 2} cells")

    @property
    def num_answers(self) -> int:
        return self.max_count - self.min_count + 1


def _distractor(target: tuple[str, str], rng: random.Random) -> tuple[str, str]:
    """An object sharing exactly one attribute with the target."""
    color, shape = target
    if rng.random() < 0.5:
        return next(c for c in COLORS if c != color), shape
    return color, next(s for s in SHAPES if s != shape)


def draw_scene(objects: list[tuple[str, str, int]], opts: SyntheticOptions) -> Image.Image:
    """Objects ``(color, shape, cell index)`` drawn without anti-aliasing (pure colours), each inset by
    2 px in its cell: squares fill their box, circles about 78% of it."""
    image = Image.new("RGB", (opts.size, opts.size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    grid = opts.size // opts.cell
    for color, shape, index in objects:
        x0, y0 = (index % grid) * opts.cell + 2, (index // grid) * opts.cell + 2
        box = (x0, y0, x0 + opts.cell - 5, y0 + opts.cell - 5)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return image


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_rows(n: int, seed: int, split: str, opts: SyntheticOptions) -> list[dict]:
    """``n`` rows of a split; answers cycle through the K values before shuffling (exactly uniform
    when K divides n). Each row also carries ``objects`` (for tests and debugging)."""
    opts.validate()
    rng = random.Random(f"megatron_vgpo-synthetic/{seed}/{split}")
    counts = [opts.min_count + i % opts.num_answers for i in range(n)]
    rng.shuffle(counts)
    targets = [(c, s) for c in COLORS for s in SHAPES] if opts.all_targets else [("red", "circle")]
    cells = (opts.size // opts.cell) ** 2
    rows = []
    for count in counts:
        target = rng.choice(targets)
        kinds = [target] * count + [_distractor(target, rng) for _ in range(rng.randint(0, opts.max_distractors))]
        objects = [(c, s, i) for (c, s), i in zip(kinds, rng.sample(range(cells), len(kinds)))]
        rows.append({
            "problem": QUESTION.format(color=target[0], shape=target[1]),
            "answer": str(count),
            "images": [{"bytes": _png(draw_scene(objects, opts)), "path": None}],
            "objects": [f"{c} {s} @{i}" for c, s, i in objects],
        })
    return rows


def blank_rows(rows: list[dict], opts: SyntheticOptions) -> list[dict]:
    """The same rows with blank images (no objects): accuracy on them measures guessing."""
    blank = _png(draw_scene([], opts))
    return [dict(r, images=[{"bytes": blank, "path": None}], objects=[]) for r in rows]


def write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("problem", pa.string()), ("answer", pa.string()),
        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("objects", pa.list_(pa.string())),
    ])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def write_synthetic_dataset(output: str | Path, train: int, val: int, seed: int,
                            opts: SyntheticOptions = SyntheticOptions()) -> dict[str, Path]:
    """Write ``train.parquet``, ``val.parquet`` and ``val_blank.parquet`` into ``output``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    val_rows = make_rows(val, seed, "val", opts)
    splits = {"train": make_rows(train, seed, "train", opts), "val": val_rows,
              "val_blank": blank_rows(val_rows, opts)}
    paths = {}
    for name, rows in splits.items():
        paths[name] = out / f"{name}.parquet"
        write_parquet(rows, paths[name])
    return paths
