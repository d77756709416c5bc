"""The whole evaluation on hand-written benchmark files, with a fake engine whose responses are fixed per
question, so every verdict is known in advance (the expected ones are written below), in both file
formats; avg@k; resume after a failed batch and after a line cut short; refused resumes."""

from __future__ import annotations

import json

import pytest

from megatron_vgpo.data.prompt import INSTRUCTION
from megatron_vgpo.evaluation import EvalError
from megatron_vgpo.evaluation.runner import run
from megatron_vgpo.rewards.extract import last_boxed
from tests.evaluation.conftest import FakeEngine, eval_config, table_responder, write_easyr1, write_sharegpt

# benchmark -> (question, label, the fake model's response, expected verdict); None: the row is skipped.
CASES = {
    "mathvista": [
        ("<image>What is 1 + 2?", "3", "<think>1 + 2 = 3</think> \\boxed{3}", True),       # plain match
        ("<image>What fraction of the disc is shaded?", "\\frac{1}{2}", "\\boxed{0.5}", True),  # mathruler: 0.5 = 1/2
        ("<image>Which angle is marked? A. 30 B. 45", "B", "\\boxed{B. 45}", True),       # only the letter rule
        ("<image>How many sides has the polygon?", "5", "It has 5 sides.", False),         # no \boxed{}
    ],
    "geo3k": [
        ("<image>Find x.", "2", "\\boxed{3}", False),
        ("<image>Find the ratio of AB to CD.", "\\frac{1}{2}", "\\boxed{\\frac{2}{4}}", True),  # only math-verify
        ("<image>Find the angle ABC.", "30", "\\boxed{30} no, \\boxed{45}", False),       # the LAST box counts
        ("<image>Which triangle is right? A. ABC B. ABD C. ACD", "C", "\\boxed{c}", True),  # letter, any case
        ("Find the area.", "12", "\\boxed{12}", None),  # one image but no <image>: skipped (placeholder_mismatch)
    ],
    "counting": [
        ("<image>How many red circles are there?", "2", "\\boxed{2}", True),
        ("<image>How many blue squares are there?", "0", "\\boxed{1}", False),
    ],
}
# mathvista 3/4, geo3k 2/4 (its 5th row skipped), counting 1/2; averages over the benchmarks present.
EXPECTED_TABLE = (
    "| model | MathVista | MathVerse | WeMath | MMK12 | GeoMath | Geo3k | LogicVista | Counting | MMMU-Pro | "
    "MathVerse-V | Avg-Math (2/6) | Avg-Vision (1/4) | Overall (3/10) |\n"
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    "| tiny | 75.0 | - | - | - | - | 50.0 | - | 50.0 | - | - | 62.5 | 50.0 | 58.3 |")
RESPONSES = {q.removeprefix("<image>"): resp for rows in CASES.values() for q, _, resp, _ in rows}


def write_cases(root, fmt: str) -> list[str]:
    """The CASES as files under ``root``; returns the ``--files`` overrides for the EasyR1 format."""
    files = []
    for key, rows in CASES.items():
        pairs = [(q, label) for q, label, _, _ in rows]
        if fmt == "sharegpt":
            write_sharegpt(root, key, pairs)
        else:
            files.append(f"{key}={write_easyr1(root / 'easyr1' / f'{key}.parquet', pairs)}")
    return files


def read_items(output) -> list[dict]:
    return [json.loads(line) for line in (output / "items.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fmt", ["sharegpt", "easyr1"])
def test_hand_checked_verdicts_and_table(tiny_model, tokenizer, tmp_path, fmt):
    files = write_cases(tmp_path / "data", fmt)
    out = tmp_path / "out"
    cfg = eval_config(tiny_model, tmp_path / "data", out, benchmarks=list(CASES), files=files, batch_size=3)
    engine = FakeEngine(tokenizer, table_responder(RESPONSES))
    assert run(cfg, engine=engine) == EXPECTED_TABLE

    items = {(r["benchmark"], r["id"]): r for r in read_items(out)}
    for key, rows in CASES.items():
        for n, (question, label, response, verdict) in enumerate(rows):
            if verdict is None:
                assert (key, f"{key}:{n}") not in items
                continue
            r = items[(key, f"{key}:{n}")]
            assert (r["correct"], r["label"], r["response"], r["sample"]) == (verdict, label, response, 0)
            assert r["extracted"] == last_boxed(response)
            # The paper's prompt: image first, no literal <image>, the instruction once (the data's copy removed).
            assert "<image>" not in r["prompt"] and r["prompt"].count(INSTRUCTION) == 1
            assert f"<|vision_end|>{question.removeprefix('<image>')}\n\n{INSTRUCTION}" in r["prompt"]
    results = json.loads((out / "results.json").read_text())
    geo = results["benchmarks"]["geo3k"]
    assert (geo["rows"], geo["items"], geo["correct"], geo["skipped"]) == (5, 4, 2, {"placeholder_mismatch": 1})
    assert geo["skipped_rows"][0]["id"] == "geo3k:4"
    assert results["averages"] == pytest.approx({"Avg-Math": 62.5, "Avg-Vision": 50.0, "Overall": 175 / 3})
    csv = (out / "results.csv").read_text().splitlines()
    assert csv[0] == "name,column,accuracy,items,samples,correct,skipped"
    assert csv[1:4] == ["mathvista,MathVista,75.0000,4,4,3,0", "geo3k,Geo3k,50.0000,4,4,2,1",
                        "counting,Counting,50.0000,2,2,1,0"]


def test_avg_at_k_and_seeds(tiny_model, tokenizer, tmp_path):
    write_sharegpt(tmp_path / "data", "counting", [("<image>How many A?", "1"), ("<image>How many B?", "2")])
    responses = {"How many A?": ["\\boxed{1}", "\\boxed{2}", "\\boxed{1}"],   # 2 of 3 samples right
                 "How many B?": ["\\boxed{2}", "\\boxed{2}", "\\boxed{2}"]}   # 3 of 3
    engine = FakeEngine(tokenizer, table_responder(responses))
    cfg = eval_config(tiny_model, tmp_path / "data", tmp_path / "out", benchmarks=["counting"], samples=3,
                      temperature=1.0, seed=100, batch_size=1)
    table = run(cfg, engine=engine)
    assert "| 83.3 |" in table  # 5 of 6 samples
    # Item i's samples are seeded from seed + i * K, however the items are batched.
    assert [[seed for _, seed in call] for call in engine.calls] == [[100], [103]]
    assert sorted((r["id"], r["sample"]) for r in read_items(tmp_path / "out")) == [
        ("counting:0", 0), ("counting:0", 1), ("counting:0", 2), ("counting:1", 0), ("counting:1", 1),
        ("counting:1", 2)]


def test_resume_after_a_failed_batch_and_a_cut_line(tiny_model, tokenizer, tmp_path):
    write_cases(tmp_path / "data", "sharegpt")
    cfg = eval_config(tiny_model, tmp_path / "data", tmp_path / "out", benchmarks=list(CASES), batch_size=2)
    with pytest.raises(RuntimeError, match="killed"):  # the second batch never comes back
        run(cfg, engine=FakeEngine(tokenizer, table_responder(RESPONSES), fail_on=1))
    first = read_items(tmp_path / "out")
    assert [r["id"] for r in first] == ["mathvista:0", "mathvista:1"]
    with open(tmp_path / "out" / "items.jsonl", "a") as f:  # a kill in the middle of a write
        f.write('{"benchmark": "mathvista", "id": "mathvista:2", "sam')

    engine = FakeEngine(tokenizer, table_responder(RESPONSES))
    assert run(cfg, engine=engine) == EXPECTED_TABLE
    asked = [prompt for call in engine.calls for prompt, _ in call]
    assert len(asked) == 8 and not any("What is 1 + 2?" in p or "fraction" in p for p in asked)
    ids = [(r["benchmark"], r["id"]) for r in read_items(tmp_path / "out")]
    assert len(ids) == len(set(ids)) == 10
    # A third run has nothing left to generate and prints the same table.
    engine = FakeEngine(tokenizer, table_responder(RESPONSES))
    assert run(cfg, engine=engine) == EXPECTED_TABLE and engine.calls == []


def test_resume_with_other_settings_is_refused(tiny_model, tokenizer, tmp_path):
    write_cases(tmp_path / "data", "sharegpt")
    cfg = eval_config(tiny_model, tmp_path / "data", tmp_path / "out", benchmarks=["counting"])
    run(cfg, engine=FakeEngine(tokenizer, table_responder(RESPONSES)))
    cfg.max_new_tokens, cfg.grader = 64, "mathruler"
    with pytest.raises(EvalError, match=r"grader: 'lookback' -> 'mathruler'; max_new_tokens: 2048 -> 64"):
        run(cfg, engine=FakeEngine(tokenizer, table_responder(RESPONSES)))


def test_resume_after_the_file_changed_is_refused(tiny_model, tokenizer, tmp_path):
    write_sharegpt(tmp_path / "data", "counting", [("<image>How many red circles are there?", "2")])
    cfg = eval_config(tiny_model, tmp_path / "data", tmp_path / "out", benchmarks=["counting"])
    run(cfg, engine=FakeEngine(tokenizer, table_responder(RESPONSES)))
    write_sharegpt(tmp_path / "data", "counting", [("<image>How many red circles are there?", "3")])
    with pytest.raises(EvalError, match=r"counting:0: .*\(label '2', now '3'\): the benchmark file changed"):
        run(cfg, engine=FakeEngine(tokenizer, table_responder(RESPONSES)))
