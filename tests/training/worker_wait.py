"""Waiting for a worker process to reach a point it announces by writing files (the checkpoint
kill tests): fails with the worker's log when it exits first or does not get there in time."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest


def wait_for_files(paths: list[Path], proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    """Until every path in ``paths`` exists. ``what``: the point, as the failure message names it.
    On a timeout the worker's process group (it runs in a session of its own) is killed."""
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            pytest.fail(f"the worker exited {proc.returncode} before {what}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the worker did not get to {what} within {timeout}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.1)
