"""Read one data file (parquet, json or jsonl) as rows, and name the datasets of a file list.

Parquet stays a memory-mapped Arrow table and a row is materialised only when it is read, so a
39K-row ViRL39K file with embedded images does not become 39K Python dicts of bytes. JSON is either a
list of row objects or an object of equal-length column lists; JSONL is one row object per line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


class DatasetError(ValueError):
    """A data file that cannot be used as given (unreadable, wrong format, missing column, ...)."""


class MissingColumnError(DatasetError):
    """A required column (data.prompt_key / answer_key / image_key) is absent from a file."""


SUFFIXES = (".parquet", ".json", ".jsonl")


class RowSource:
    """The rows of one data file; ``row(i)`` returns the requested columns of row ``i`` as a dict.

    ``columns`` must be in the file; ``optional`` columns are read when the file has them (``row``
    leaves the absent ones out)."""

    def __init__(self, path: str | os.PathLike, columns: Iterable[str], optional: Iterable[str] = ()):
        self.path = Path(path)
        self.columns = tuple(columns)
        self._optional = tuple(c for c in optional if c not in self.columns)
        if not self.path.is_file():
            raise DatasetError(f"data file not found: {self.path}")
        suffix = self.path.suffix.lower()
        if suffix not in SUFFIXES:
            raise DatasetError(f"{self.path}: unsupported data file type {suffix!r} (expected one of "
                               f"{', '.join(SUFFIXES)})")
        try:
            self._table, self._rows, available = self._read(suffix)
        except DatasetError:
            raise
        except Exception as e:
            raise DatasetError(f"{self.path}: cannot read {suffix[1:]} file: {type(e).__name__}: {e}") from e
        # An empty JSON file has no columns to check; it is reported as empty by the dataset.
        for column in self.columns if (self._table is not None or self._rows) else ():
            if column not in available:
                raise MissingColumnError(f"{self.path}: missing column {column!r} (columns present: "
                                         f"{', '.join(sorted(available)) or 'none'})")
        self.columns += tuple(c for c in self._optional if c in available)

    def _read(self, suffix: str) -> tuple[Any, list | None, set[str]]:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(self.path, columns=None, memory_map=True)
            available = set(table.column_names)
            table = table.select([c for c in (*self.columns, *self._optional) if c in available])
            return table, None, available
        text = self.path.read_text(encoding="utf-8")
        if suffix == ".jsonl":
            rows = []
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DatasetError(f"{self.path}:{n}: invalid JSON line: {e}") from e
        else:
            data = json.loads(text)
            if isinstance(data, dict):  # column-oriented: {"problem": [...], "answer": [...]}
                lengths = {len(v) for v in data.values() if isinstance(v, list)}
                if len(lengths) != 1 or not all(isinstance(v, list) for v in data.values()):
                    raise DatasetError(f"{self.path}: a JSON object must map columns to equal-length lists")
                n = lengths.pop()
                rows = [{k: v[i] for k, v in data.items()} for i in range(n)]
            elif isinstance(data, list):
                rows = data
            else:
                raise DatasetError(f"{self.path}: JSON must be a list of rows or an object of columns")
        if not all(isinstance(r, dict) for r in rows):
            raise DatasetError(f"{self.path}: every row must be a JSON object")
        # A column counts as present when at least one row has it; rows lacking it read as None and
        # are then skipped with a reason (a sparse JSONL key is a row problem, not a file problem).
        available = set().union(*(r.keys() for r in rows)) if rows else set()
        return None, rows, available

    def __len__(self) -> int:
        return self._table.num_rows if self._table is not None else len(self._rows)

    def row(self, i: int) -> dict:
        if self._table is not None:
            return {c: self._table.column(c)[i].as_py() for c in self.columns}
        return {c: self._rows[i].get(c) for c in self.columns}


def dataset_names(paths: list[str]) -> list[str]:
    """A short unique name per file: the file stem (``geo3k/test.parquet`` -> ``test``), extended by
    parent directories only where two stems collide (``geo3k/test``, ``mmk12/test``)."""
    parts = [Path(p).with_suffix("").parts for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(pp[-d:]) for pp, d in zip(parts, depth)]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return names
        grown = False
        for i, n in enumerate(names):
            if n in clashes and depth[i] < len(parts[i]):
                depth[i] += 1
                grown = True
        if not grown:  # the same file listed twice
            raise DatasetError(f"data file listed twice: {sorted(clashes)}")
