"""Small benchmark files in the PAPO-Eval layout, drawn from the synthetic counting task (offline tests,
the README's example). The CLI is ``tools/make_eval_fixtures.py``.

For each benchmark ``KEY`` (upstream split name ``SPLIT``, see ``benchmarks.py``), ``rows`` rows of
"How many <colour> <shape>s are in the image?" (``data/synthetic.py``'s scenes, answers 0-3):

    OUT/KEY.json                          sharegpt rows: {"messages": [user "<image>Q <instruction>",
                                          assistant LABEL], "images": ["./data/images/SPLIT/SPLIT_i_0.png"]}
    OUT/images/SPLIT/SPLIT_i_0.png        the images (default), or
    OUT/SPLIT_images.zip                  with --zip: members SPLIT/SPLIT_i_0.png, as PAPO_eval's archives
    OUT/easyr1/KEY.parquet                with --easyr1: the same rows in the EasyR1 schema, images embedded

Even rows have a number as label; odd rows are multiple choice ("Choices: A. 0 B. 1 C. 2 D. 3",
label a letter), which exercises the grader's single-letter rule. As in PAPO-Eval, the user turn ends
with the paper's instruction (the evaluation removes it before adding its own). ``bad_rows`` appends
four rows to ``geo3k`` that the evaluation must skip and name: ``geo3k:R`` without ``<image>``,
``geo3k:R+1`` with a corrupt image, ``geo3k:R+2`` with an empty label, ``geo3k:R+3`` whose image is
missing (R = ``rows``).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from megatron_vgpo.data.prompt import INSTRUCTION
from megatron_vgpo.data.synthetic import SyntheticOptions, make_rows
from megatron_vgpo.evaluation.benchmarks import BENCHMARKS, BY_KEY

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BAD_ROWS_IN = "geo3k"


def fixture_rows(key: str, rows: int, seed: int, opts: SyntheticOptions) -> list[dict]:
    """``{"question", "label", "image"}`` rows: ``<image>`` question, label string, PNG bytes."""
    out = []
    for i, row in enumerate(make_rows(rows, seed, f"eval-{key}", replace(opts, all_targets=True))):
        question, label = row["problem"], row["answer"]
        if i % 2:
            choices = " ".join(f"{LETTERS[k]}. {c}" for k, c in enumerate(range(opts.min_count, opts.max_count + 1)))
            question, label = f"{question}\nChoices: {choices}", LETTERS[int(label) - opts.min_count]
        out.append({"question": question, "label": label, "image": row["images"][0]["bytes"]})
    return out


def _bad_rows(good: dict) -> list[dict]:
    return [dict(good, question=good["question"].replace("<image>", "")),
            dict(good, image=b"not an image"),
            dict(good, label=""),
            dict(good, image=None)]


def write_eval_fixtures(output: str | Path, rows: int = 4, seed: int = 0, benchmarks: Optional[Sequence[str]] = None,
                        zipped: bool = False, easyr1: bool = False, bad_rows: bool = False,
                        opts: SyntheticOptions = SyntheticOptions()) -> dict[str, Path]:
    """Write the files (see the module docstring); returns ``{key: sharegpt json path}``."""
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for key in benchmarks or [b.key for b in BENCHMARKS]:
        split = BY_KEY[key].aliases[0]
        items = fixture_rows(key, rows, seed, opts)
        if bad_rows and key == BAD_ROWS_IN:
            items += _bad_rows(items[0])
        images = {f"{split}/{split}_{i}_0.png": item["image"] for i, item in enumerate(items)
                  if item["image"] is not None}
        sharegpt = [{"messages": [{"role": "user", "content": f"{item['question']} {INSTRUCTION}"},
                                  {"role": "assistant", "content": item["label"]}],
                     "images": [f"./data/images/{split}/{split}_{i}_0.png"]} for i, item in enumerate(items)]
        written[key] = out / f"{key}.json"
        written[key].write_text(json.dumps(sharegpt, indent=1) + "\n")
        if zipped:
            with zipfile.ZipFile(out / f"{split}_images.zip", "w") as zf:
                for name, data in images.items():
                    zf.writestr(name, data)
        else:
            for name, data in images.items():
                (out / "images" / name).parent.mkdir(parents=True, exist_ok=True)
                (out / "images" / name).write_bytes(data)
        if easyr1:
            _write_easyr1(out / "easyr1" / f"{key}.parquet", items)
    return written


def _write_easyr1(path: Path, items: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("problem", pa.string()), ("answer", pa.string()),
                        ("images", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())])))])
    rows = [{"problem": item["question"], "answer": item["label"],
             "images": [{"bytes": item["image"], "path": None if item["image"] is not None else "missing.png"}]}
            for item in items]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
