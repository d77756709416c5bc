"""Bad inputs through the whole training loop: skipped, counted and named, never a crash deep inside.

- Rows with a corrupt image, a placeholder/image count mismatch, an unusable answer or a prompt past
  ``rollout.max_prompt_length`` are skipped and logged with their row ids and per-file counts; numeric
  answers are coerced to strings; the run trains on the rest and finishes.
- A file missing the answer column, or with no usable row, stops the run with the named error
  (``MissingColumnError``, ``NoUsableExamplesError``) naming the file.
- A custom reward function that raises on some responses and hangs on others: those responses score
  0, the failures are logged with their row ids and counted (``reward/error_rate``,
  ``reward/timeout_rate``), and the run finishes.

``tests/data`` and ``tests/rewards`` test each check on its own; here they meet the real loop. The
four runs are launched together by one fixture, two at a time (each is one process on one core).
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest

from megatron_vgpo.utils.deps import has
from tests.e2e.loop import RUN_NAME, run_trains, train_command, train_env, write_module

pytestmark = [pytest.mark.distributed, pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not has("vllm"), reason="vLLM is not installed (CPU: pip install -e '.[cpu-rollout]')")]

STEPS = ("trainer.total_steps=2", "data.rollout_batch_size=4", "trainer.global_batch_size=4")
"""Two steps over 4 prompts each: the whole usable data of the datasets below, every step."""


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    from megatron_vgpo.data.synthetic import SyntheticOptions, make_rows

    return make_rows(n, seed, "train", SyntheticOptions())


def write_table(rows: list[dict], path: Path) -> Path:
    """Rows as parquet with the column types inferred (an int or list ``answer`` column)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "objects"} for r in rows]), path)
    return path


def failed(proc, error: str) -> str:
    """The run exited non-zero with ``error`` (the exception's class name) before building the model
    or starting the engine (data is read first)."""
    assert proc.returncode != 0, proc.stdout[-6000:]
    assert error in proc.stdout, proc.stdout[-6000:]
    assert not re.search(r"^step 1/", proc.stdout, re.M)
    assert "vLLM engine built" not in proc.stdout
    return proc.stdout


BAD_REWARD = '''
    """A user reward that fails on purpose, chosen by the row's ground truth."""
    import time


    def reward(response, ground_truth, info):
        if ground_truth == "raise":
            raise ValueError(f"cannot grade row {info['row_id']}")
        if ground_truth == "hang":
            time.sleep(3600)
        return 1.0
    '''


def bad_rows_files(root: Path) -> list[Path]:
    """mixed.parquet (2 good rows among 6 bad ones), numbers.parquet (int answers), lists.parquet."""
    from megatron_vgpo.data.synthetic import write_parquet

    rows = synthetic_rows(12)
    png = rows[0]["images"][0]["bytes"]
    mixed = [
        rows[0],
        dict(rows[1], images=[{"bytes": png[:60], "path": None}]),  # 1: a truncated PNG
        dict(rows[2], images=[{"bytes": b"not an image", "path": None}]),  # 2
        dict(rows[3], problem="<image>" + rows[3]["problem"]),  # 3: two placeholders, one image
        rows[4],
        dict(rows[5], problem=rows[5]["problem"].replace("<image>", "")),  # 5: no placeholder, one image
        dict(rows[6], answer=None),  # 6
        dict(rows[7], problem=rows[7]["problem"] + " long" * 600),  # 7: > max_prompt_length 512
    ]
    write_parquet(mixed, root / "mixed.parquet")
    numbers = write_table([dict(r, answer=int(r["answer"])) for r in rows[8:10]], root / "numbers.parquet")
    lists = write_table([dict(r, answer=[r["answer"]]) for r in rows[10:12]], root / "lists.parquet")
    return [root / "mixed.parquet", numbers, lists]


def all_bad_file(root: Path) -> Path:
    from megatron_vgpo.data.synthetic import write_parquet

    rows = synthetic_rows(4)
    bad = [dict(rows[0], images=[{"bytes": b"junk", "path": None}]), dict(rows[1], answer=None),
           dict(rows[2], problem="no placeholder"), dict(rows[3], images=[])]
    write_parquet(bad, root / "allbad.parquet")
    return root / "allbad.parquet"


def bad_reward_file(root: Path) -> Path:
    from megatron_vgpo.data.synthetic import write_parquet

    rows = synthetic_rows(4)
    write_parquet([dict(rows[0], answer="raise"), dict(rows[1], answer="hang"), rows[2], rows[3]],
                  root / "train.parquet")
    return root / "train.parquet"


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict:
    """name -> (output directory, the finished run) for the four runs below."""
    root = tmp_path_factory.mktemp("bad_inputs")
    dirs = {name: root / name for name in ("bad_rows", "no_answer", "all_bad", "bad_reward")}
    for d in dirs.values():
        d.mkdir()
    no_answer = write_table([{k: v for k, v in r.items() if k != "answer"} for r in synthetic_rows(4)],
                            dirs["no_answer"] / "noanswer.parquet")
    reward_env = train_env(write_module(dirs["bad_reward"] / "pymod", "e2e_bad_reward", BAD_REWARD))
    launches = {
        "bad_rows": (train_command(tiny_model, bad_rows_files(dirs["bad_rows"]), dirs["bad_rows"], *STEPS), None),
        "bad_reward": (train_command(tiny_model, [bad_reward_file(dirs["bad_reward"])], dirs["bad_reward"], *STEPS,
                                     "reward.custom_fn=e2e_bad_reward:reward", "reward.timeout_s=1",
                                     "reward.num_workers=2"), reward_env),
        "no_answer": (train_command(tiny_model, [no_answer], dirs["no_answer"], *STEPS), None),
        "all_bad": (train_command(tiny_model, [all_bad_file(dirs["all_bad"])], dirs["all_bad"], *STEPS), None),
    }
    done = run_trains(launches)
    return {name: (dirs[name], proc) for name, proc in done.items()}


def test_bad_rows_are_skipped_named_and_counted(runs):
    from megatron_vgpo.training.logging import read_scalars

    out_dir, proc = runs["bad_rows"]
    out = proc.stdout
    assert proc.returncode == 0, out[-8000:]
    skipped = {"mixed:1": "image_decode_error", "mixed:2": "image_decode_error", "mixed:3": "placeholder_mismatch",
               "mixed:5": "placeholder_mismatch", "mixed:6": "answer_not_string", "mixed:7": "prompt_too_long",
               "lists:0": "answer_not_string", "lists:1": "answer_not_string"}
    for row_id, reason in skipped.items():
        assert f"skipping row {row_id} ({reason})" in out, row_id
    assert len(re.findall(r"skipping row ", out)) == len(skipped), "a good row was skipped"
    summary = re.search(r"mixed\.parquet: skipped 6 of 8 rows (\{.*?\}); kept 2", out)
    assert summary, out[-8000:]
    assert ast.literal_eval(summary.group(1)) == {"image_decode_error": 2, "placeholder_mismatch": 2,
                                                  "answer_not_string": 1, "prompt_too_long": 1}
    assert "lists.parquet: skipped 2 of 2 rows {'answer_not_string': 2}; kept 0 (this file contributes nothing)" in out
    assert "numbers.parquet: skipped" not in out  # int answers are coerced, not refused

    scalars = read_scalars(out_dir / "runs" / RUN_NAME)
    assert [s for s, _ in scalars["actor/pg_loss"]] == [1, 2]
    assert all(math.isfinite(v) for _, v in scalars["actor/pg_loss"])
    # Every step graded all 4 usable prompts, the coerced numeric answers among them, without an error.
    assert scalars["reward/error_rate"] == [(1, 0.0), (2, 0.0)]


def test_missing_answer_column_stops_the_run_naming_column_and_file(runs):
    out_dir, proc = runs["no_answer"]
    out = failed(proc, "MissingColumnError")
    assert f"{out_dir / 'noanswer.parquet'}: missing column 'answer'" in out


def test_no_usable_row_stops_the_run_naming_the_file(runs):
    out_dir, proc = runs["all_bad"]
    out = failed(proc, "NoUsableExamplesError")
    assert re.search(rf"no usable rows in {re.escape(str(out_dir / 'allbad.parquet'))}: 4 skipped", out), out[-6000:]


def test_reward_function_that_raises_or_hangs_scores_zero_and_the_run_goes_on(runs):
    from megatron_vgpo.training.logging import read_scalars

    out_dir, proc = runs["bad_reward"]
    out = proc.stdout
    assert proc.returncode == 0, out[-8000:]
    assert "reward: row train:0 scored 0 (error): ValueError: cannot grade row train:0" in out
    assert "reward: row train:1 scored 0 (timeout): timed out after 1 s (worker killed)" in out

    scalars = read_scalars(out_dir / "runs" / RUN_NAME)
    assert [s for s, _ in scalars["actor/pg_loss"]] == [1, 2]
    # Per step 8 responses (4 prompts x 2): the 2 that raised and the 2 that hung score 0, the rest 1.
    assert scalars["reward/accuracy"] == [(1, 0.5), (2, 0.5)]
    assert scalars["reward/error_rate"] == [(1, 0.5), (2, 0.5)]
    assert scalars["reward/timeout_rate"] == [(1, 0.25), (2, 0.25)]
