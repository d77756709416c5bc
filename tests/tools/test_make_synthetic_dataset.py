"""The synthetic counting task: schema, determinism, uniform answers, and that the images really show
the counted objects (decoded and counted from pixels, independently of the generator)."""

import importlib.util
import io
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_vgpo.data.synthetic import SyntheticOptions, make_rows

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_synthetic_dataset.py"
_spec = importlib.util.spec_from_file_location("make_synthetic_dataset", TOOL)
_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tool)
main = _tool.main


def read(path):
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic")
    assert main(["--output", str(d), "--train", "40", "--val", "12", "--seed", "3"]) == 0
    return d


def components(image, predicate):
    """4-connected components of the pixels satisfying ``predicate``, as lists of (x, y)."""
    w, h = image.size
    px = image.load()
    seen, comps = set(), []
    for y in range(h):
        for x in range(w):
            if (x, y) in seen or not predicate(px[x, y]):
                continue
            stack, comp = [(x, y)], []
            seen.add((x, y))
            while stack:
                cx, cy = stack.pop()
                comp.append((cx, cy))
                for nx, ny in ((cx + 1, cy), (cx - 1, cy), (cx, cy + 1), (cx, cy - 1)):
                    if 0 <= nx < w and 0 <= ny < h and (nx, ny) not in seen and predicate(px[nx, ny]):
                        seen.add((nx, ny))
                        stack.append((nx, ny))
            comps.append(comp)
    return comps


def is_red(p):
    return p[0] > 150 and p[1] < 100 and p[2] < 100


def is_blue(p):
    return p[2] > 150 and p[0] < 100 and p[1] < 150


def count_shapes(image, predicate):
    """(circles, squares): a square fills its bounding box, a circle about pi/4 of it."""
    circles = squares = 0
    for comp in components(image, predicate):
        xs, ys = [p[0] for p in comp], [p[1] for p in comp]
        fill = len(comp) / ((max(xs) - min(xs) + 1) * (max(ys) - min(ys) + 1))
        assert len(comp) >= 40, "objects are solid blobs, not stray pixels"
        if fill > 0.95:
            squares += 1
        else:
            circles += 1
    return circles, squares


def decode(row):
    return Image.open(io.BytesIO(row["images"][0]["bytes"])).convert("RGB")


def test_schema(out):
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet", "val.parquet", "val_blank.parquet"]
    table = pq.read_table(out / "train.parquet")
    assert {"problem", "answer", "images"} <= set(table.column_names)
    images_type = table.schema.field("images").type
    assert pa.types.is_list(images_type)
    assert images_type.value_type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    for row in table.to_pylist():
        assert row["problem"] == "<image>How many red circles are in the image?"
        assert isinstance(row["answer"], str) and len(row["images"]) == 1
        assert decode(row).size == (56, 56)


def test_deterministic_per_seed(out, tmp_path):
    assert main(["--output", str(tmp_path), "--train", "40", "--val", "12", "--seed", "3"]) == 0
    for name in ("train", "val", "val_blank"):
        assert read(tmp_path / f"{name}.parquet") == read(out / f"{name}.parquet")
    other = make_rows(40, 4, "train", SyntheticOptions())
    assert [r["images"] for r in other] != [r["images"] for r in read(out / "train.parquet")]


def test_answers_are_uniform(out):
    assert Counter(r["answer"] for r in read(out / "train.parquet")) == {str(k): 10 for k in range(4)}
    assert Counter(r["answer"] for r in read(out / "val.parquet")) == {str(k): 3 for k in range(4)}


def test_the_answer_is_in_the_pixels(out):
    for row in read(out / "train.parquet") + read(out / "val.parquet"):
        image = decode(row)
        red_circles, red_squares = count_shapes(image, is_red)
        blue_circles, blue_squares = count_shapes(image, is_blue)
        assert red_circles == int(row["answer"])
        assert blue_squares == 0  # distractors share exactly one attribute with the target
        assert red_squares + blue_circles == len(row["objects"]) - red_circles


def test_distractors_do_not_give_the_answer_away(out):
    """Counting all red things or all circles would not solve the task."""
    rows = read(out / "train.parquet")
    assert sum(len(r["objects"]) != int(r["answer"]) for r in rows) > len(rows) // 2


def test_blank_split_is_blank_with_the_same_questions(out):
    val, blank = read(out / "val.parquet"), read(out / "val_blank.parquet")
    assert [(r["problem"], r["answer"]) for r in blank] == [(r["problem"], r["answer"]) for r in val]
    for row in blank:
        assert decode(row).getcolors() == [(56 * 56, (255, 255, 255))]


def test_all_targets_and_bad_options(tmp_path):
    rows = make_rows(16, 0, "train", SyntheticOptions(all_targets=True, size=84, max_count=4))
    assert len({r["problem"] for r in rows}) == 4
    for row in rows:
        color, shape = row["problem"].split("How many ")[1].split(" ")[:2]
        circles, squares = count_shapes(decode(row), is_red if color == "red" else is_blue)
        assert (circles if shape == "circles" else squares) == int(row["answer"])
    assert main(["--output", str(tmp_path), "--size", "60"]) == 2
