"""``items.jsonl``: the per-item results, appended batch by batch, and the resume that reads them back.

One line per (benchmark, item, sample): ``{"benchmark", "id", "sample", "prompt", "response",
"extracted", "label", "correct", "finish_reason"}`` (plus ``"grading_error"`` when grading failed or
timed out: such a sample counts as wrong). Each batch's lines are written, flushed and fsynced
before the next batch starts, so a killed run loses at most the batch in flight; a line cut short by
the kill is dropped (and cut from the file) when the run is restarted, and its item is generated
again. An item counts as done when all its ``--samples`` lines are there.

``run.json`` beside it holds the settings that decide the responses and verdicts (model, decoding,
pixels, grader, ...): a restart with different ones is refused, naming them, rather than mixing two
evaluations in one table. ``--limit`` and ``--benchmarks`` may change between restarts: the table
covers the items of the current run only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from megatron_vgpo.evaluation.benchmarks import EvalError

ITEMS_FILE = "items.jsonl"
SETTINGS_FILE = "run.json"


def check_settings(output: Path, settings: dict) -> None:
    """Write ``run.json``, or compare with the one a previous run left (EvalError on a difference)."""
    path = output / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
        if changed:
            diff = "; ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise EvalError(f"{output} holds an evaluation with other settings ({diff}); use another --output "
                            f"or delete {path} and {output / ITEMS_FILE}")
        return
    output.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


class ItemStore:
    """The records of ``items.jsonl``, keyed by ``(benchmark, id, sample)``; appends are durable."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[tuple[str, str, int], dict] = {}
        if path.is_file():
            self._load()

    def _load(self) -> None:
        data = self.path.read_bytes()
        good = 0  # bytes of complete, parseable lines
        for line in data.splitlines(keepends=True):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("no newline")
                record = json.loads(line)
            except ValueError:
                if good + len(line) < len(data):
                    raise EvalError(f"{self.path}: unreadable line at byte {good} (not the last one): "
                                    f"the file is damaged; delete it to start over")
                break  # the last line, cut short by a kill: dropped below
            self.records[(record["benchmark"], record["id"], record["sample"])] = record
            good += len(line)
        if good < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def done(self, benchmark: str, item_id: str, samples: int) -> bool:
        return all((benchmark, item_id, j) in self.records for j in range(samples))

    def samples_of(self, benchmark: str, item_id: str, samples: int) -> list[dict]:
        return [self.records[(benchmark, item_id, j)] for j in range(samples)
                if (benchmark, item_id, j) in self.records]

    def append(self, records: Iterable[dict]) -> None:
        records = list(records)
        with open(self.path, "a", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        for r in records:
            self.records[(r["benchmark"], r["id"], r["sample"])] = r
