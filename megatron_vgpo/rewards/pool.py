"""Grading worker processes with a wall-clock limit per call; a hung worker is killed and replaced.

sympy can hang on adversarial answers (math-verify on ``\\boxed{10^{10^{10^{10}}}}`` never returns
without its own alarm), and a user reward function can do anything. Each call therefore runs in a
worker process and gets ``timeout_s`` of wall-clock time from the moment it is handed to a worker;
past it the worker is SIGKILLed (the only thing that stops a C-level loop), the call scores as a
timeout, and a fresh worker takes its place while the other workers go on grading. Workers are plain
``python -c`` interpreters (see ``worker.py`` for why not multiprocessing).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Optional

_WORKER_CMD = "import sys; from megatron_vgpo.rewards.worker import main; main(sys.argv[1:])"


class RewardWorkerError(RuntimeError):
    """Grading workers cannot start (their grader or custom function fails to load, or they crash)."""


@dataclass
class Outcome:
    status: str
    """"ok", "error" or "timeout"."""
    value: object
    """The worker's result dict when ok, else a message."""


@dataclass
class _Worker:
    proc: subprocess.Popen
    jobs: Connection
    results: Connection
    started: float
    ready: bool = False
    task: Optional[int] = None
    deadline: float = field(default=0.0)


class GradingPool:
    """``num_workers`` grading processes running ``worker.make_job(grader, custom_fn)``."""

    def __init__(self, num_workers: int, timeout_s: float, grader: str, custom_fn: str = "",
                 startup_timeout_s: float = 120.0):
        if num_workers < 1 or timeout_s <= 0:
            raise ValueError(f"need num_workers >= 1 and timeout_s > 0, got {num_workers}, {timeout_s}")
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        self._args = [grader] + ([custom_fn] if custom_fn else [])
        self.replaced = 0
        """Workers killed and replaced after a timeout or a crash, over the pool's life."""
        self._workers = [self._spawn() for _ in range(num_workers)]
        # Runs on close(), garbage collection or interpreter exit, whichever comes first.
        self._finalizer = weakref.finalize(self, GradingPool._shutdown, self._workers)

    def _spawn(self) -> _Worker:
        job_r, job_w = os.pipe()
        res_r, res_w = os.pipe()
        # The worker must import what this process imports (the package, a custom function's module).
        path = [p or os.getcwd() for p in sys.path] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        try:
            proc = subprocess.Popen([sys.executable, "-c", _WORKER_CMD, str(job_r), str(res_w), *self._args],
                                    pass_fds=(job_r, res_w), env=env, stdin=subprocess.DEVNULL)
        finally:
            os.close(job_r)
            os.close(res_w)
        return _Worker(proc, Connection(job_w, readable=False), Connection(res_r, writable=False), time.monotonic())

    @staticmethod
    def _stop(worker: _Worker, graceful: bool) -> None:
        if graceful and worker.proc.poll() is None:
            try:
                worker.jobs.send(None)
            except OSError:
                pass
        for conn in (worker.jobs, worker.results):
            conn.close()
        try:
            worker.proc.wait(timeout=2.0 if graceful else 0.0)
        except subprocess.TimeoutExpired:
            pass
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()

    @staticmethod
    def _shutdown(workers: list[_Worker]) -> None:
        for worker in workers:
            if not worker.jobs.closed:  # a worker still starting up is just killed
                GradingPool._stop(worker, graceful=worker.ready)

    def _replace(self, i: int) -> None:
        self._stop(self._workers[i], graceful=False)
        self._workers[i] = self._spawn()
        self.replaced += 1

    def close(self) -> None:
        self._finalizer()

    def map(self, jobs: list[tuple[str, str, dict]]) -> list[Outcome]:
        """Run ``(response, ground_truth, info)`` jobs; outcomes in the same order."""
        outcomes: list[Optional[Outcome]] = [None] * len(jobs)
        queue = collections.deque(range(len(jobs)))
        workers = self._workers
        for i, w in enumerate(workers):
            if w.task is not None:  # left busy by an interrupted call: its late answer must not count
                self._replace(i)
        while queue or any(w.task is not None for w in workers):
            now = time.monotonic()
            for i, w in enumerate(workers):
                if w.ready and w.task is None and queue:
                    task = queue.popleft()
                    try:
                        w.jobs.send((task, *jobs[task]))
                    except OSError:  # the idle worker died (killed from outside): retry on a fresh one
                        queue.appendleft(task)
                        self._replace(i)
                        continue
                    w.task, w.deadline = task, time.monotonic() + self.timeout_s
            waiting = [w for w in workers if not w.ready or w.task is not None]
            deadlines = [w.deadline if w.ready else w.started + self.startup_timeout_s for w in waiting]
            for conn in wait([w.results for w in waiting], timeout=max(0.0, min(deadlines) - now)):
                i = next(k for k, w in enumerate(workers) if w.results is conn)
                self._receive(i, outcomes)
            now = time.monotonic()
            for i, w in enumerate(workers):
                if w.task is not None and now >= w.deadline:
                    outcomes[w.task] = Outcome("timeout", f"timed out after {self.timeout_s:g} s (worker killed)")
                    self._replace(i)
                elif not w.ready and now >= w.started + self.startup_timeout_s:
                    raise RewardWorkerError(f"a grading worker did not start within {self.startup_timeout_s:g} s")
        return outcomes

    def _receive(self, i: int, outcomes: list) -> None:
        w = self._workers[i]
        try:
            message = w.results.recv()
        except (EOFError, OSError):
            code = w.proc.wait()
            if w.task is None:
                raise RewardWorkerError(f"a grading worker exited during start-up (exit code {code}); "
                                        f"see its traceback above")
            outcomes[w.task] = Outcome("error", f"grading worker died (exit code {code})")
            self._replace(i)
            return
        if message[0] == "ready":
            w.ready = True
        elif message[0] == "init_error":
            raise RewardWorkerError(f"grading worker failed to load: {message[1]}")
        else:
            task, status, value = message
            outcomes[task] = Outcome(status, value)
            w.task = None
