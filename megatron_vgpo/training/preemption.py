"""Stopping a run cleanly on request: finish the current step, save a checkpoint, exit 0.

A request is one of ``trainer.stop_signals`` (SIGTERM, which SLURM sends before killing a job, and
SIGUSR1, which ``#SBATCH --signal`` can send ahead of the time limit) received by any rank, or a file
named ``STOP`` in ``checkpoint.save_dir`` (what the SLURM batch script writes when its own signal
arrives: a batch script's trap reaches every node through the shared filesystem, where a signal to
torchrun would not reach the workers). The ranks agree with one all-reduce per step, so they all stop
after the same step. The next run of the same command resumes from that checkpoint (``latest``); the
STOP file is removed once the checkpoint is complete, so the restarted job does not stop at once.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STOP_FILE = "STOP"


class StopRequest:
    """Installs the signal handlers; ``requested()`` (collective) says whether any rank was asked to stop."""

    def __init__(self, signals: list[str], save_dir: str | Path, rank: int = 0, device: torch.device | str = "cpu"):
        self.stop_file, self.rank, self.device = Path(save_dir) / STOP_FILE, rank, device
        self.received: Optional[str] = None
        for name in signals:
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self) -> Optional[str]:
        """The reason (a signal name or the stop file) when any rank was asked to stop, else None."""
        reason = self.received or (f"{self.stop_file} exists" if self.stop_file.exists() else None)
        flag = torch.tensor([1 if reason else 0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():
            return None
        return reason or "another rank was asked to stop"

    def clear(self) -> None:
        """Remove the stop file (rank 0), once the run has saved because of it."""
        if self.rank == 0:
            self.stop_file.unlink(missing_ok=True)
