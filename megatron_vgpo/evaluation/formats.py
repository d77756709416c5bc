r"""Benchmark files as users have them -> one EasyR1 JSONL per benchmark, checked by ``PromptDataset``.

Two input formats, told apart by their columns (JSON list, JSONL or parquet, read with ``RowSource``):

- sharegpt (PAPO-Eval, Look-Back): ``{"messages": [{"role": "user", "content": "<image>Q"},
  {"role": "assistant", "content": LABEL}], "images": [paths]}``. Paths such as
  ``./data/images/<split>/<file>.png`` (LLaMA-Factory's layout) are looked up, with ``./`` and
  ``data/`` dropped, under the data file's directory and ``--data-root``, then inside every ``*.zip``
  there (``images.zip``, or PAPO_eval's ``<split>_images.zip`` whose members are
  ``<split>/<file>``); a member is extracted once into ``OUTPUT/prepared/images/``.
- EasyR1 (this project's training schema): ``problem`` with ``<image>``, ``answer``, ``images``
  (``{"bytes", "path"}`` structs, bytes or paths relative to the file). Embedded bytes are written
  once to ``OUTPUT/prepared/images/embedded/<sha256>`` (the prepared file is JSONL: no bytes).

Each benchmark becomes ``OUTPUT/prepared/<name>.jsonl`` with ``problem``, ``answer`` and absolute
image paths, and ``PromptDataset`` reads it with the training rules: a row whose ``<image>`` count
differs from its images, whose image does not decode, or whose answer is unusable is skipped,
counted per reason and named (``<name>:<row>``). Rows keep their index in the source file, so ids
are stable across runs and ``--limit N`` (the first N rows) keeps them.

The evaluation prompt (METHODS_SPEC 7): the training prompt (``data/prompt.py``) with the ``<image>``
placeholders removed from the question and the images placed first; a copy of the paper's
instruction already at the end of a question (PAPO-Eval bakes it in) is removed so that it is not
repeated. A row whose placeholders do not match its images keeps its problem unchanged, so that
``PromptDataset`` skips it with that reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Optional

from megatron_vgpo.data.prompt import IMAGE_PLACEHOLDER, INSTRUCTION
from megatron_vgpo.data.sources import MissingColumnError, RowSource
from megatron_vgpo.evaluation.benchmarks import EvalError

SHAREGPT_COLUMNS = ("messages", "images")
EASYR1_COLUMNS = ("problem", "answer", "images")
_TRAILING_INSTRUCTION = re.compile(r"\s*" + r"\s+".join(map(re.escape, INSTRUCTION.split())) + r"\s*$")


def eval_problem(problem: Any, num_images: int) -> Any:
    """The question with its placeholders moved to the front (images first) and a trailing copy of
    the instruction removed; unchanged when it is not a string or its placeholders do not match."""
    if not isinstance(problem, str) or problem.count(IMAGE_PLACEHOLDER) != num_images:
        return problem
    question = _TRAILING_INSTRUCTION.sub("", problem.replace(IMAGE_PLACEHOLDER, "")).strip()
    return IMAGE_PLACEHOLDER * num_images + question


def open_rows(path: Path) -> tuple[str, RowSource]:
    """``("sharegpt" | "easyr1", rows)``; a file with neither schema is an ``EvalError``."""
    try:
        return "sharegpt", RowSource(path, SHAREGPT_COLUMNS)
    except MissingColumnError:
        pass
    try:
        return "easyr1", RowSource(path, EASYR1_COLUMNS)
    except MissingColumnError as e:
        raise EvalError(f"{path}: neither sharegpt ({', '.join(SHAREGPT_COLUMNS)}) nor EasyR1 "
                        f"({', '.join(EASYR1_COLUMNS)}) columns: {e}") from e


def _turn(messages: Any, roles: tuple[str, ...]) -> Optional[str]:
    for m in messages if isinstance(messages, list) else []:
        if isinstance(m, dict) and m.get("role", m.get("from")) in roles:
            content = m.get("content", m.get("value"))
            return content if isinstance(content, str) else None
    return None


def _relative(ref: str) -> str:
    """``./data/images/a/b.png`` -> ``images/a/b.png`` (LLaMA-Factory's data directory prefix)."""
    text = ref.strip().replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return text[len("data/"):] if text.startswith("data/images/") else text


class ImageFiles:
    """Turns image cells into absolute paths: files on disk, zip members and embedded bytes."""

    def __init__(self, roots: list[Path], cache: Path):
        self.roots, self.cache = roots, cache
        self._members: Optional[dict[str, tuple[Path, str]]] = None

    def _zip_index(self) -> dict[str, tuple[Path, str]]:
        """Member name (also without a leading ``images/``) -> (zip, member), for every zip in the roots."""
        if self._members is None:
            self._members = {}
            for zpath in sorted({z for root in self.roots for z in root.glob("*.zip")}):
                with zipfile.ZipFile(zpath) as zf:
                    for name in zf.namelist():
                        parts = PurePosixPath(name).parts
                        if name.endswith("/") or name.startswith("/") or ".." in parts:
                            continue  # directories, and names that would escape the cache
                        self._members.setdefault(name, (zpath, name))
                        if parts[0] == "images" and len(parts) > 1:
                            self._members.setdefault("/".join(parts[1:]), (zpath, name))
        return self._members

    def path(self, ref: str) -> str:
        if os.path.isabs(ref):
            return ref
        rel = _relative(ref)
        tried = [root / rel for root in self.roots]
        hit = next((p for p in tried if p.is_file()), None)
        if hit is not None:
            return str(hit.absolute())
        stripped = rel[len("images/"):] if rel.startswith("images/") else rel
        member = self._zip_index().get(rel) or self._zip_index().get(stripped)
        if member is None:
            return str(tried[-1].absolute())  # absent: PromptDataset skips the row naming this path
        target = self.cache / member[1]
        with zipfile.ZipFile(member[0]) as zf:
            if not target.is_file() or target.stat().st_size != zf.getinfo(member[1]).file_size:
                with zf.open(member[1]) as src:
                    _write_atomically(target, lambda dst: shutil.copyfileobj(src, dst))
        return str(target.absolute())

    def embedded(self, data: bytes) -> str:
        """Embedded image bytes as a file named by their hash (the same image is written once)."""
        target = self.cache / "embedded" / hashlib.sha256(data).hexdigest()[:32]
        if not target.is_file():
            _write_atomically(target, lambda dst: dst.write(data))
        return str(target.absolute())

    def cell(self, cell: Any) -> Any:
        """An image cell as an absolute path; a cell of another kind is kept (and skipped later)."""
        if isinstance(cell, dict):
            cell = cell["bytes"] if cell.get("bytes") is not None else cell.get("path") or cell
        if isinstance(cell, (bytes, bytearray)):
            return self.embedded(bytes(cell))
        return self.path(cell) if isinstance(cell, str) else cell


def _write_atomically(target: Path, write) -> None:
    """``write(binary file)`` into ``target`` via a temporary file: a kill leaves no partial image."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as dst:
        write(dst)
    os.replace(tmp, target)


def _cells(value: Any) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def easyr1_row(fmt: str, row: dict, images: ImageFiles) -> dict:
    """One source row as the prepared EasyR1 row (problem, answer, absolute image paths)."""
    paths = [images.cell(c) for c in _cells(row["images"])]
    if fmt == "sharegpt":
        problem, answer = _turn(row["messages"], ("user", "human")), _turn(row["messages"], ("assistant", "gpt"))
    else:
        problem, answer = row["problem"], row["answer"]
    return {"problem": eval_problem(problem, len(paths)), "answer": answer, "images": paths}


def prepare(key: str, path: Path, data_root: Path, prepared_dir: Path, limit: Optional[int] = None) -> tuple[str, Path]:
    """Write ``prepared_dir/<key>.jsonl`` from the benchmark file; returns ``(format, prepared path)``."""
    fmt, rows = open_rows(path)
    images = ImageFiles([path.parent.absolute(), data_root.absolute()], prepared_dir / "images")
    # A value JSON cannot hold (bytes where text belongs) becomes null: the row is then skipped.
    text = "".join(json.dumps(easyr1_row(fmt, rows.row(i), images), default=lambda _: None) + "\n"
                   for i in range(len(rows) if limit is None else min(limit, len(rows))))
    out = prepared_dir / f"{key}.jsonl"
    # Rewritten only when it changes: its mtime keys PromptDataset's scan cache, which a resume then reuses.
    if not out.is_file() or out.read_text(encoding="utf-8") != text:
        prepared_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".jsonl.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    return fmt, out
