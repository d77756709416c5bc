"""The synthetic benchmark files (evaluation/fixtures.py, tools/make_eval_fixtures.py) in the PAPO-Eval
layout, evaluated with a fake engine: every format gives the same verdicts, and the bad rows are
skipped, counted per reason and named."""

from __future__ import annotations

import json
import zipfile

from megatron_vgpo.data.synthetic import SyntheticOptions, make_rows
from megatron_vgpo.evaluation import BENCHMARKS
from megatron_vgpo.evaluation.fixtures import write_eval_fixtures
from megatron_vgpo.evaluation.runner import run
from tests.evaluation.conftest import FakeEngine, eval_config
from tools.make_eval_fixtures import main as make_fixtures

KEYS = ["geo3k", "counting"]


def always_zero(prompt: str, j: int) -> str:
    return "<think>I see nothing.</think> \\boxed{0}"


def evaluate(tiny_model, tokenizer, data_root, output, **kw) -> dict:
    run(eval_config(tiny_model, data_root, output, benchmarks=KEYS, **kw), engine=FakeEngine(tokenizer, always_zero))
    return json.loads((output / "results.json").read_text())


def test_layout_and_labels(tmp_path):
    assert make_fixtures(["--output", str(tmp_path), "--rows", "4", "--zip", "--easyr1"]) == 0
    for b in BENCHMARKS:
        rows = json.loads((tmp_path / f"{b.key}.json").read_text())
        split = b.aliases[0]
        assert [r["images"] for r in rows] == [[f"./data/images/{split}/{split}_{i}_0.png"] for i in range(4)]
        with zipfile.ZipFile(tmp_path / f"{split}_images.zip") as zf:
            assert sorted(zf.namelist()) == [f"{split}/{split}_{i}_0.png" for i in range(4)]
        assert (tmp_path / "easyr1" / f"{b.key}.parquet").is_file()
    assert not (tmp_path / "images").exists()


def test_multiple_choice_rows_have_letter_labels(tmp_path):
    write_eval_fixtures(tmp_path, rows=6, benchmarks=["counting"])
    rows = json.loads((tmp_path / "counting.json").read_text())
    counts = [r["answer"] for r in make_rows(6, 0, "eval-counting", SyntheticOptions(all_targets=True))]
    for i, (r, count) in enumerate(zip(rows, counts)):
        question, label = r["messages"][0]["content"], r["messages"][1]["content"]
        if i % 2:  # the letter of the option whose value is the scene's count
            assert "Choices: A. 0 B. 1 C. 2 D. 3" in question and label == "ABCD"[int(count)]
        else:
            assert "Choices" not in question and label == count


def test_bad_rows_skipped_counted_named_in_every_format(tiny_model, tokenizer, tmp_path):
    write_eval_fixtures(tmp_path / "folder", rows=4, benchmarks=KEYS, easyr1=True, bad_rows=True)
    write_eval_fixtures(tmp_path / "zipped", rows=4, benchmarks=KEYS, zipped=True, bad_rows=True)
    runs = {"folder": evaluate(tiny_model, tokenizer, tmp_path / "folder", tmp_path / "o1"),
            "zipped": evaluate(tiny_model, tokenizer, tmp_path / "zipped", tmp_path / "o2"),
            "easyr1": evaluate(tiny_model, tokenizer, tmp_path / "folder", tmp_path / "o3",
                               files=[f"{k}={tmp_path / 'folder' / 'easyr1' / f'{k}.parquet'}" for k in KEYS])}
    labels = {k: [r["messages"][1]["content"] for r in json.loads((tmp_path / "folder" / f"{k}.json").read_text())[:4]]
              for k in KEYS}
    for name, results in runs.items():
        for k in KEYS:
            r = results["benchmarks"][k]
            # The fake model always answers 0: right exactly on the rows labelled "0".
            assert (r["items"], r["correct"]) == (4, labels[k].count("0")), (name, k)
        geo = results["benchmarks"]["geo3k"]
        assert geo["rows"] == 8 and geo["skipped"] == {"placeholder_mismatch": 1, "image_decode_error": 2,
                                                       "answer_not_string": 1}, name
        named = {s["id"]: (s["reason"], s["detail"]) for s in geo["skipped_rows"]}
        assert sorted(named) == ["geo3k:4", "geo3k:5", "geo3k:6", "geo3k:7"]
        assert named["geo3k:5"][0] == named["geo3k:7"][0] == "image_decode_error"
        assert "image file not found" in named["geo3k:7"][1] or "missing.png" in named["geo3k:7"][1]
        assert results["benchmarks"]["counting"]["skipped"] == {}
    assert runs["folder"]["table"] == runs["zipped"]["table"] == runs["easyr1"]["table"]
