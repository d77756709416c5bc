"""Output directories that appear complete or not at all.

A conversion writes into ``<output>.tmp-<pid>`` next to the destination and renames it to ``<output>``
only once everything is written, so an interrupted run never leaves a directory at ``<output>``
that looks like a checkpoint: on an exception the temporary directory is removed; after a kill
(SIGKILL, power loss) a ``*.tmp-<pid>`` directory stays behind under that name, and a Megatron one
has no ``metadata.json`` (written last), which ``dist_checkpointing.load`` refuses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable, Iterator


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (``kill``, ``timeout``, a cluster scheduler) into ``SystemExit``, so that
    ``atomic_output`` removes its temporary directory as it does on Ctrl-C. For CLIs' ``main``."""
    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def check_output(out: Path, force: bool, source: Path | None = None) -> None:
    """FileExistsError unless ``out`` is absent, an empty directory, or ``force`` is set; ValueError
    when ``out`` is, or contains, the ``source`` being converted (``--force`` would delete it)."""
    if source is not None and (out == source.absolute() or out in source.absolute().parents):
        raise ValueError(f"output {out} is the input {source} or contains it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"output {out} exists and is not empty; pass --force to replace it")


@contextlib.contextmanager
def atomic_output(output: str | Path, force: bool = False, source: Path | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``output`` when the block completes."""
    out = Path(output).absolute()
    check_output(out, force, source)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    # Move the old output aside first, so that a failure in between leaves one complete directory.
    old = out.parent / f"{out.name}.old-{os.getpid()}"
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old)


def add_output_flags(parser) -> None:
    """``--force`` and ``--no-progress``, shared by the conversion scripts."""
    parser.add_argument("--force", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_conversion(name: str, convert: Callable[[], Path]) -> int:
    """A conversion script's exit status: ``convert()`` with SIGTERM turned into a clean exit, its output
    directory printed (0), or a bad input / existing output named on stderr (2)."""
    exit_cleanly_on_sigterm()
    try:
        out = convert()
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0

