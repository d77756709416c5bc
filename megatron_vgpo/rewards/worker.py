"""A grading worker process: ``python -m megatron_vgpo.rewards.worker JOB_FD RESULT_FD GRADER [CUSTOM_FN]``.

Started by ``pool.GradingPool`` as a fresh interpreter (not a multiprocessing fork/spawn child, which
would re-import the trainer's ``__main__`` and with it torch and Megatron in every worker): it imports
only the grader, says ``("ready", pid)``, then answers ``(task_id, response, ground_truth, info)``
messages with ``(task_id, "ok", {"accuracy", "format", "extra"})`` or ``(task_id, "error", text)``
until its job pipe closes. Messages are pickled ``multiprocessing`` Connection frames on two pipes
passed as file descriptors, so whatever a user function prints cannot corrupt them.
"""

from __future__ import annotations

import signal
import sys
import warnings
from multiprocessing.connection import Connection
from typing import Callable

from megatron_vgpo.rewards.custom import load_custom_fn, normalize_output
from megatron_vgpo.rewards.graders import accuracy, load_grader

Job = Callable[[str, str, dict], dict]


def make_job(grader: str, custom_fn: str = "") -> Job:
    """The per-response grading function of a worker: the custom function, or the accuracy grader."""
    if custom_fn:
        fn = load_custom_fn(custom_fn)
        return lambda response, ground_truth, info: normalize_output(fn(response, ground_truth, info))
    grade = load_grader(grader)
    return lambda response, ground_truth, info: {
        "accuracy": accuracy(grade, response, ground_truth), "format": None, "extra": {}}


def run_job(job: Job, response: str, ground_truth: str, info: dict) -> tuple[str, object]:
    """``("ok", result)`` or ``("error", "ExcType: message")``; never raises for a grading error."""
    try:
        return "ok", job(response, ground_truth, info)
    except (Exception, SystemExit) as e:  # a user function calling sys.exit() is an error, not a shutdown
        return "error", f"{type(e).__name__}: {e}"


def serve(jobs: Connection, results: Connection, grader: str, custom_fn: str) -> None:
    try:
        job = make_job(grader, custom_fn)
    except Exception as e:
        results.send(("init_error", f"{type(e).__name__}: {e}"))
        return
    results.send(("ready", None))
    while True:
        message = jobs.recv()
        if message is None:
            return
        task_id, response, ground_truth, info = message
        results.send((task_id, *run_job(job, response, ground_truth, info)))


def main(argv: list[str]) -> None:
    # Ctrl-C reaches the whole process group; the trainer shuts the pool down, the workers need not.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore")  # sympy deprecation chatter, once per worker and expression
    job_fd, result_fd, grader = int(argv[0]), int(argv[1]), argv[2]
    custom_fn = argv[3] if len(argv) > 3 else ""
    try:
        serve(Connection(job_fd, writable=False), Connection(result_fd, readable=False), grader, custom_fn)
    except (EOFError, OSError):  # the trainer closed the pool (or died): nothing left to answer
        pass


if __name__ == "__main__":
    main(sys.argv[1:])
