"""The CLI end to end with the real vLLM engine on the tiny model (CPU): under torchrun with two
data-parallel engines, and killed (SIGKILL) after its first batch then resumed, which must give the
same responses and table as the uninterrupted two-engine run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_vgpo.evaluation.fixtures import write_eval_fixtures
from tests.conftest import REPO
from tests.rollout.conftest import requires_vllm

pytestmark = [pytest.mark.vllm, pytest.mark.slow, requires_vllm]

KEYS = ["geo3k", "counting"]
SMALL = ["--max-new-tokens", "16", "--min-pixels", "3136", "--max-pixels", "12544", "--dtype", "float32",
         "--kv-cache-memory-bytes", str(64 << 20), "--enforce-eager", "--max-prompt-length", "512",
         "--grading-workers", "1"]
TIMEOUT = 600


def cli(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data-root", str(data), "--output", str(output), "--benchmarks", *KEYS,
            *SMALL, *extra]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def items(output: Path) -> dict[tuple[str, str], dict]:
    return {(r["benchmark"], r["id"]): r for r in map(json.loads, (output / "items.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval_data")
    write_eval_fixtures(root, rows=3, benchmarks=KEYS, zipped=True)
    return root


@pytest.fixture(scope="module")
def reference(tiny_model, data, tmp_path_factory) -> tuple[Path, str]:
    """Two ranks, two engines of TP 1 sharing every batch of 2 prompts; rank 0 writes and prints."""
    from megatron_vgpo.distributed.parallel import free_port

    out = tmp_path_factory.mktemp("eval_dp") / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "megatron_vgpo.evaluate", *cli(tiny_model, data, out, "--batch-size", "2", "--tp", "1")]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    return out, proc.stdout


def test_torchrun_data_parallel_run(reference):
    out, stdout = reference
    assert stdout.count("| model | MathVista |") == 1  # rank 0 only
    table = json.loads((out / "results.json").read_text())["table"]
    assert table in stdout and "| - | - | - | - | - |" in table  # 2 of the 10 benchmarks
    records = items(out)
    assert sorted(records) == [(k, f"{k}:{i}") for k in sorted(KEYS) for i in range(3)]
    assert all(r["finish_reason"] in ("stop", "length") and isinstance(r["correct"], bool) for r in records.values())
    assert (out / "results.csv").is_file() and (out / "prepared" / "images").is_dir()  # the zip was extracted


def test_killed_after_first_batch_then_resumed(tiny_model, data, reference, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "out"
    args = [sys.executable, "-m", "megatron_vgpo.evaluate", *cli(tiny_model, data, out, "--batch-size", "1")]
    proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    try:
        while not ((out / "items.jsonl").is_file() and (out / "items.jsonl").read_text().count("\n") >= 1):
            assert proc.poll() is None, "the run ended before its first batch was written"
            assert time.monotonic() < deadline, "no batch written in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the engine and the grading workers with it
    finally:
        proc.wait()
    written = (out / "items.jsonl").read_text().count("\n")
    assert 1 <= written < 6, f"{written} items written before the kill: the kill came too late to test a resume"

    resumed = subprocess.run(args, cwd=REPO, env=env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    ref_table = json.loads((ref_out / "results.json").read_text())["table"]
    assert json.loads((out / "results.json").read_text())["table"] == ref_table
    assert ref_table.splitlines()[2] in resumed.stdout
    ours, ref = items(out), items(ref_out)
    assert sorted(ours) == sorted(ref)
    for key in ref:
        assert (ours[key]["response"], ours[key]["correct"]) == (ref[key]["response"], ref[key]["correct"]), key
