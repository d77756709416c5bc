"""Every rank resumes from the same checkpoint (issue 17): rank 0 checks the manifest and broadcasts
its verdict, and a load that fails on one rank only makes every rank fall back together (torchrun,
two ranks, gloo; the saves are asynchronous). Worker: ``multirank_ckpt_worker.py``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_torchrun

WORKER = Path(__file__).with_name("multirank_ckpt_worker.py")


@pytest.mark.distributed
@pytest.mark.slow
def test_both_ranks_fall_back_to_the_same_checkpoint(tmp_path):
    out = run_torchrun(WORKER, 2, tmp_path / "ckpt", timeout=600)
    for label in ("one rank fails", "truncated shard"):
        for rank in (0, 1):
            assert f"{label}: rank {rank} resumed step 1, tensors equal" in out, out[-4000:]
    assert "failed to load (rank 1: RuntimeError: rank 1 cannot read its part); falling back to the previous" in out
    assert "__0_0.distcp has 1000 bytes" in out
