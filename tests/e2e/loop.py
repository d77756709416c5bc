"""Launching the real entry point (``python -m megatron_vgpo.train`` under torchrun) for the e2e tests.

One CPU process (a world of one), the tiny random Qwen2.5-VL, two prompts x two responses of 16
tokens per step, no validation: a step takes well under a second, so a run costs mostly its start-up
(imports, model, vLLM engine). ``run_train`` waits for a run (``run_trains`` for several, two at a
time); ``start_train`` starts one with its output in a file, so that a test can watch it, and
``kill_run`` SIGKILLs all of its processes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "configs" / "cpu_tiny.yaml"
RUN_NAME = "cpu_tiny"  # logging.run_name of CONFIG: the TensorBoard logs are in <out>/runs/cpu_tiny
TIMEOUT_S = 600

SMALL = ("data.val_files=[]", "trainer.val_interval=0", "trainer.val_before_train=false",
         "trainer.format_warmup.steps=0", "data.rollout_batch_size=2", "trainer.global_batch_size=2",
         "trainer.micro_batch_size=2", "rollout.n=2", "rollout.max_response_length=16",
         "algorithm.dynamic_sampling.max_batches=1", "rollout.kv_cache_memory_bytes=67108864",
         "logging.progress_bar=true")
"""Overrides of CONFIG that make a step cheap. ``progress_bar`` on a non-terminal prints one plain
``step k/N`` line per step, after the step's scalars are flushed: the tests watch for it."""


def train_command(model: Path, train_files: list[Path], out: Path, *overrides: str) -> list[str]:
    """The torchrun command of a one-process run writing its checkpoints to ``out/ckpt`` and its
    TensorBoard logs to ``out/runs``; ``overrides`` come last and win."""
    from megatron_vgpo.distributed.parallel import free_port

    files = ",".join(str(f) for f in train_files)
    args = [f"model.hf_path={model}", f"data.train_files=[{files}]", f"checkpoint.save_dir={out / 'ckpt'}",
            f"logging.tensorboard_dir={out / 'runs'}", *SMALL, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={free_port()}",
            "-m", "megatron_vgpo.train", "--config", str(CONFIG), *args]


def train_env(*pythonpath: Path) -> dict:
    """The test's environment, one thread per op, ``pythonpath`` prepended (custom reward modules)."""
    path = os.pathsep.join([*map(str, pythonpath), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}


def run_train(cmd: list[str], env: Optional[dict] = None, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run to the end; stdout and stderr together in ``.stdout``. Past ``timeout`` every process of
    the run is killed and the test fails with the run's output."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_run(proc)
        output, _ = proc.communicate()
        raise AssertionError(f"the run did not finish in {timeout:g} s:\n{output[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, output)


def run_trains(runs: dict[str, tuple[list[str], dict]], at_once: int = 2) -> dict[str, subprocess.CompletedProcess]:
    """``run_train`` for each ``name: (cmd, env)``, ``at_once`` runs at a time: a one-process run
    keeps one core busy (single-threaded start-up, ``OMP_NUM_THREADS=1``), so on the 2-core machine
    two of them take about the time of one."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(at_once) as pool:
        futures = {name: pool.submit(run_train, cmd, env) for name, (cmd, env) in runs.items()}
        return {name: future.result() for name, future in futures.items()}


def start_train(cmd: list[str], log: Path, env: Optional[dict] = None) -> subprocess.Popen:
    """Start a run in a new session, stdout and stderr into ``log``."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env or train_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_run(proc: subprocess.Popen) -> None:
    """SIGKILL the whole run, so that nothing gets to clean up: torchrun starts each trainer rank in
    a session of its own (its grading workers are in that rank's process group), so each rank's
    group is killed, the ranks first, then torchrun's."""
    import psutil

    try:
        ranks = psutil.Process(proc.pid).children()
    except psutil.NoSuchProcess:
        ranks = []
    groups = []
    for rank in ranks:
        try:
            groups.append(os.getpgid(rank.pid))
        except ProcessLookupError:
            pass
    for group in [*groups, proc.pid]:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.monotonic() + 30
    while (alive := [r for r in ranks if _running(r)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive, f"trainer processes survived SIGKILL: {alive}"


def _running(process) -> bool:
    """Not gone and not a zombie (an orphan is reaped by whoever adopted it, maybe never)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_for(proc: subprocess.Popen, condition: Callable[[], bool], what: str, log: Path,
             timeout: float = TIMEOUT_S, poll_s: float = 0.005) -> None:
    """Poll ``condition`` every ``poll_s`` until it holds; fail (killing the run) if the run exits or
    ``timeout`` passes first."""
    deadline = time.monotonic() + timeout
    while not condition():
        code = proc.poll()
        if code is not None or time.monotonic() > deadline:
            kill_run(proc)
            why = f"exited with {code}" if code is not None else f"ran {timeout:g} s"
            raise AssertionError(f"the run {why} before {what}:\n{tail(log)}")
        time.sleep(poll_s)


def logged_step(log: Path, step: int, total: int) -> bool:
    """The run printed its progress line of ``step``: the step's scalars are in TensorBoard."""
    return log.is_file() and f"step {step}/{total} " in log.read_text(errors="replace")


def latest(save_dir: Path) -> Optional[str]:
    """The checkpoint that ``save_dir/latest`` names (None before the first save)."""
    try:
        return (save_dir / "latest").read_text().strip()
    except FileNotFoundError:
        return None


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.is_file() else "(no log)"


def write_module(directory: Path, name: str, source: str) -> Path:
    """A Python module ``name`` in ``directory`` (put ``directory`` on PYTHONPATH to import it)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return directory
