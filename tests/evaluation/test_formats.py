"""Reading benchmark files: sharegpt (JSON, parquet) and EasyR1, images from folders, zips and bytes, and
the evaluation prompt's question (placeholders out, images first, the data's own instruction removed)."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_vgpo.data.prompt import INSTRUCTION
from megatron_vgpo.evaluation import EvalError
from megatron_vgpo.evaluation.formats import _relative, eval_problem, prepare
from tests.evaluation.conftest import png


def read_prepared(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_eval_problem():
    assert eval_problem(f"<image>Find x. {INSTRUCTION}", 1) == "<image>Find x."
    assert eval_problem(f"Find x in <image>.\n{INSTRUCTION.replace(' ', chr(10), 2)}", 1) == "<image>Find x in ."
    assert eval_problem("<image>Compare <image> and this.", 2) == "<image><image>Compare  and this."
    assert eval_problem("Find x.", 0) == "Find x."
    assert eval_problem("Find x.", 1) == "Find x."          # mismatch: unchanged, PromptDataset skips it
    assert eval_problem(None, 1) is None
    # Only a trailing copy of the instruction is removed.
    assert eval_problem(f"{INSTRUCTION} Then find x.<image>", 1) == f"<image>{INSTRUCTION} Then find x."


def test_relative_image_paths():
    assert _relative("./data/images/geo/a.png") == "images/geo/a.png"
    assert _relative("images\\geo\\a.png") == "images/geo/a.png"
    assert _relative("a.png") == "a.png"


def sharegpt_row(question: str, label: str, images: list) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": label}],
            "images": images}


def test_sharegpt_json_with_an_images_folder(tmp_path):
    (tmp_path / "images" / "geo").mkdir(parents=True)
    (tmp_path / "images" / "geo" / "0.png").write_bytes(png())
    rows = [sharegpt_row(f"<image>Q0 {INSTRUCTION}", "3", ["./data/images/geo/0.png"]),
            sharegpt_row("<image>Q1", "A", ["./data/images/geo/missing.png"]),
            {"messages": [{"role": "user", "content": "<image>Q2"}], "images": ["images/geo/0.png"]}]  # no label
    (tmp_path / "geo3k.json").write_text(json.dumps(rows))
    fmt, path = prepare("geo3k", tmp_path / "geo3k.json", tmp_path, tmp_path / "prep")
    assert fmt == "sharegpt" and path == tmp_path / "prep" / "geo3k.jsonl"
    image = str(tmp_path / "images" / "geo" / "0.png")
    assert read_prepared(path) == [
        {"problem": "<image>Q0", "answer": "3", "images": [image]},
        {"problem": "<image>Q1", "answer": "A", "images": [str(tmp_path / "images" / "geo" / "missing.png")]},
        {"problem": "<image>Q2", "answer": None, "images": [image]}]
    fmt, path = prepare("geo3k", tmp_path / "geo3k.json", tmp_path, tmp_path / "prep", limit=1)
    assert len(read_prepared(path)) == 1


@pytest.mark.parametrize("archive,member", [("images.zip", "images/geo/0.png"), ("geo_images.zip", "geo/0.png")])
def test_images_from_a_zip(tmp_path, archive, member):
    with zipfile.ZipFile(tmp_path / archive, "w") as zf:
        zf.writestr(member, png())
        zf.writestr("../evil.png", b"x")  # never extracted outside the cache
    (tmp_path / "b.json").write_text(json.dumps([sharegpt_row("<image>Q", "1", ["./data/images/geo/0.png"]),
                                                 sharegpt_row("<image>Q", "1", ["../evil.png"])]))
    _, path = prepare("counting", tmp_path / "b.json", tmp_path, tmp_path / "prep")
    first, second = read_prepared(path)
    assert first["images"] == [str(tmp_path / "prep" / "images" / member)]
    assert (tmp_path / "prep" / "images" / member).read_bytes() == png()
    assert os.path.normpath(second["images"][0]) == str(tmp_path.parent / "evil.png")  # not found: skipped later
    assert not (tmp_path.parent / "evil.png").exists()


def test_sharegpt_parquet_as_on_the_hub(tmp_path):
    rows = [sharegpt_row("<image>Q", "2", [{"bytes": png(), "path": None}])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "AI4Math_MathVista.parquet")
    fmt, path = prepare("mathvista", tmp_path / "AI4Math_MathVista.parquet", tmp_path, tmp_path / "prep")
    [row] = read_prepared(path)
    assert fmt == "sharegpt" and row["problem"] == "<image>Q" and row["answer"] == "2"
    assert open(row["images"][0], "rb").read() == png()


def test_easyr1_rows_keep_their_values(tmp_path):
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "a.png").write_bytes(png())
    rows = [{"problem": "Find x.<image>", "answer": 3, "images": ["pics/a.png"]},
            {"problem": "<image>Q", "answer": float("nan"), "images": [{"bytes": None, "path": "pics/a.png"}]},
            {"problem": 7, "answer": "1", "images": []}]
    (tmp_path / "e.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fmt, path = prepare("geo3k", tmp_path / "e.jsonl", tmp_path / "root", tmp_path / "prep")
    a, b, c = read_prepared(path)
    image = str(tmp_path / "pics" / "a.png")  # relative to the data file, as in training
    assert fmt == "easyr1"
    assert a == {"problem": "<image>Find x.", "answer": 3, "images": [image]}
    assert b["answer"] != b["answer"] and b["images"] == [image]  # NaN kept: PromptDataset skips the row
    assert c == {"problem": 7, "answer": "1", "images": []}  # PromptDataset skips it (problem not a string)


def test_easyr1_parquet_with_embedded_images(tmp_path):
    rows = [{"problem": "<image>Q", "answer": "4", "images": [{"bytes": png(), "path": None}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "geo.parquet")
    fmt, path = prepare("geo3k", tmp_path / "geo.parquet", tmp_path, tmp_path / "prep")
    [row] = read_prepared(path)
    digest = hashlib.sha256(png()).hexdigest()[:32]
    assert fmt == "easyr1" and row["images"] == [str(tmp_path / "prep" / "images" / "embedded" / digest)]
    assert open(row["images"][0], "rb").read() == png()


def test_unknown_schema(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps([{"question": "Q", "label": "1"}]))
    with pytest.raises(EvalError, match="neither sharegpt .* nor EasyR1"):
        prepare("geo3k", tmp_path / "x.json", tmp_path, tmp_path / "prep")
