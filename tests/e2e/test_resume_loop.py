"""SIGKILL the whole training loop and restart it: the resumed run is the uninterrupted one.

- Killed after its checkpoint of step 4 (and after it logged step 5), a restarted run resumes from
  step 4 and its TensorBoard scalars equal, exactly (CPU), those of a run that was never
  interrupted; the steps the killed run logged after its checkpoint are purged, so each step has
  one value.
- Killed in the middle of a save (its ``step_K.tmp`` directory exists), ``latest`` still names the
  previous checkpoint, and a restart resumes from that one and finishes, again matching the
  uninterrupted run.
- SIGTERM (SLURM's warning before a kill) during a step: the run saves that step, exits 0, and the
  same command resumes from it, matching the uninterrupted run.
- A finished run whose latest checkpoint then lost the end of a shard (issue 17): the same command
  names the file in one warning line, resumes from the previous checkpoint and finishes, again
  matching the uninterrupted run.

The tiny random model never answers right, so the default reward is always 0 and no weight would
ever change; a custom reward (a hash of the response text) gives every group a spread of rewards,
hence non-zero advantages, gradients and updates: the resumed run must restore weights, Adam moments,
LR schedule, data position and RNG to match.
"""

from __future__ import annotations

import re
import shutil
import signal
from pathlib import Path

import pytest

from megatron_vgpo.utils.deps import has
from tests.e2e.loop import (RUN_NAME, kill_run, latest, logged_step, run_train, start_train, tail, train_command,
                            train_env, wait_for, write_module)

pytestmark = [pytest.mark.distributed, pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not has("vllm"), reason="vLLM is not installed (CPU: pip install -e '.[cpu-rollout]')")]

TOTAL = 8
SAVE_INTERVAL = 4  # the kill after step 5 has steps 6..8 and a save of margin before the run ends
HASH_REWARD = '''
    """A response-dependent reward in [0, 1] for the resume tests (deterministic across processes)."""
    import hashlib


    def reward(response, ground_truth, info):
        return int(hashlib.md5(response.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    '''
# Timings and throughput differ between any two runs; everything else must not.
UNREPRODUCIBLE = ("timing_s/", "perf/")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int:
    return int(name.removeprefix("step_"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    from megatron_vgpo.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("resume")
    data = write_synthetic_dataset(root / "data", train=12, val=4, seed=0)["train"]  # 6 steps an epoch
    env = train_env(write_module(root / "pymod", "e2e_hash_reward", HASH_REWARD))

    def command(out: Path, *overrides: str) -> list[str]:
        return train_command(tiny_model, [data], out, f"trainer.total_steps={TOTAL}",
                             "reward.custom_fn=e2e_hash_reward:reward", *overrides)

    return root, command, env


class Uninterrupted:
    """The run that nobody kills, started in the background (one core) while the first test's run uses
    the other; ``scalars()`` waits for it."""

    def __init__(self, root: Path, command, env):
        self.log = root / "a.log"
        self.out = root / "a"
        self.proc = start_train(command(self.out, f"checkpoint.save_interval={SAVE_INTERVAL}"), self.log, env)
        self._scalars = None

    def scalars(self) -> dict:
        from megatron_vgpo.training.logging import read_scalars

        if self._scalars is None:
            wait_for(self.proc, lambda: self.proc.poll() is not None, "finishing", self.log, poll_s=0.5)
            assert self.proc.returncode == 0, tail(self.log)
            scalars = read_scalars(self.out / "runs" / RUN_NAME)
            assert [s for s, _ in scalars["actor/pg_loss"]] == list(range(1, TOTAL + 1))
            # Otherwise the comparison below would hold for a resume that restores nothing.
            assert all(v > 0 for _, v in scalars["actor/grad_norm"]), scalars["actor/grad_norm"]
            self._scalars = scalars
        return self._scalars


@pytest.fixture(scope="module")
def uninterrupted(setup):
    run = Uninterrupted(*setup)
    yield run
    if run.proc.poll() is None:
        kill_run(run.proc)


def assert_same_run(logdir: Path, uninterrupted: Uninterrupted) -> None:
    """Every reproducible scalar of ``logdir`` equals the uninterrupted run's, once per step."""
    from megatron_vgpo.training.logging import read_scalars

    expected = uninterrupted.scalars()
    scalars = read_scalars(logdir)
    assert sorted(scalars) == sorted(expected)
    for tag, series in sorted(expected.items()):
        steps = [s for s, _ in scalars[tag]]
        assert steps == [s for s, _ in series], f"{tag}: steps {steps} (a step logged twice was not purged?)"
        if not tag.startswith(UNREPRODUCIBLE):
            assert scalars[tag] == series, f"{tag} differs from the uninterrupted run"


def resume_and_finish(command, out: Path, env, from_step: int) -> str:
    proc = run_train(command, env)
    assert proc.returncode == 0, proc.stdout[-8000:]
    ckpt = out / "ckpt"
    assert re.search(rf"resumed from \S*{step_name(from_step)} \(step {from_step}\)", proc.stdout), \
        proc.stdout[-8000:]
    assert latest(ckpt) == step_name(TOTAL)
    assert not list(ckpt.glob("*.tmp")), "a leftover temporary checkpoint was not cleared"
    return proc.stdout


def test_kill_after_checkpoint_resumes_exactly(setup, uninterrupted):
    from megatron_vgpo.training.logging import read_scalars

    root, command, env = setup
    out, log = root / "b", root / "b.log"
    ckpt, logdir = out / "ckpt", out / "runs" / RUN_NAME
    cmd = command(out, f"checkpoint.save_interval={SAVE_INTERVAL}")
    proc = start_train(cmd, log, env)
    # A step logged after the checkpoint: the restart must drop what the killed run logged past it.
    wait_for(proc, lambda: latest(ckpt) == step_name(SAVE_INTERVAL) and logged_step(log, SAVE_INTERVAL + 1, TOTAL),
             f"logging step {SAVE_INTERVAL + 1}", log)
    kill_run(proc)
    assert latest(ckpt) == step_name(SAVE_INTERVAL), f"the run finished before the kill landed:\n{tail(log)}"
    killed_steps = [s for s, _ in read_scalars(logdir)["actor/pg_loss"]]
    assert max(killed_steps) > SAVE_INTERVAL, killed_steps

    resume_and_finish(command(out, f"checkpoint.save_interval={SAVE_INTERVAL}"), out, env, SAVE_INTERVAL)
    assert_same_run(logdir, uninterrupted)


def test_kill_during_save_keeps_the_previous_latest(setup, uninterrupted):
    """Saving every step; the kill lands while the second checkpoint is still ``step_2.tmp``."""
    root, command, env = setup
    out = root / "c"
    ckpt = out / "ckpt"
    target = 2
    for attempt in range(3):
        log = root / f"c{attempt}.log"
        proc = start_train(command(out, "checkpoint.save_interval=1"), log, env)
        tmp = ckpt / (step_name(target) + ".tmp")
        wait_for(proc, tmp.is_dir, f"starting the save of step {target}", log, poll_s=0.002)
        kill_run(proc)
        if tmp.is_dir():
            break
        # The save finished between the poll and the kill (it takes a fraction of a second): this run
        # was killed after a complete save instead; aim at the next one.
        target = step_of(latest(ckpt)) + 1
        assert target < TOTAL, f"no save left to interrupt:\n{tail(log)}"
    else:
        pytest.fail(f"3 kills in a row landed after the save had finished:\n{tail(log)}")
    assert latest(ckpt) == step_name(target - 1), "a killed save moved `latest`"
    assert not (ckpt / step_name(target)).exists()

    output = resume_and_finish(command(out, "checkpoint.save_interval=1"), out, env, target - 1)
    assert f"removing {tmp} left by an interrupted save" in output
    assert_same_run(out / "runs" / RUN_NAME, uninterrupted)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(setup, uninterrupted):
    """As a user met it: a shard of the finished run's latest checkpoint cut short (a partial copy,
    a failing disk), then the same training command again."""
    root, command, env = setup
    out = root / "d"
    uninterrupted.scalars()  # it has finished
    shutil.copytree(root / "a", out)  # the uninterrupted run: checkpoints of steps 4 and 8, its logs
    ckpt = out / "ckpt"
    assert latest(ckpt) == step_name(TOTAL)
    shard = sorted((ckpt / step_name(TOTAL)).glob("*.distcp"))[0]
    with open(shard, "r+b") as f:
        f.truncate(1000)

    output = resume_and_finish(command(out, f"checkpoint.save_interval={SAVE_INTERVAL}"), out, env, SAVE_INTERVAL)
    warning = next((line for line in output.splitlines() if "falling back" in line), output[-8000:])
    assert f"{step_name(TOTAL)} is damaged: {shard.name} has 1000 bytes" in warning, warning
    assert warning.endswith(f"falling back to the previous checkpoint {step_name(SAVE_INTERVAL)}"), warning
    assert_same_run(out / "runs" / RUN_NAME, uninterrupted)


def test_sigterm_saves_exits_zero_and_resumes_exactly(setup, uninterrupted):
    """SIGTERM to the trainer (what SLURM sends before killing a job) during step k: the run finishes the
    step, saves a complete checkpoint of it, says so and exits 0; the same command resumes from it and
    the run matches the uninterrupted one."""
    import psutil

    root, command, env = setup
    out, log = root / "e", root / "e.log"
    ckpt = out / "ckpt"
    cmd = command(out, f"checkpoint.save_interval={SAVE_INTERVAL}")
    proc = start_train(cmd, log, env)
    wait_for(proc, lambda: logged_step(log, 2, TOTAL), "logging step 2", log)
    ranks = psutil.Process(proc.pid).children()  # torchrun's worker (the trainer rank)
    assert len(ranks) == 1, ranks
    ranks[0].send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, tail(log)
    output = log.read_text()
    stopped = next((line for line in output.splitlines() if "stop requested (SIGTERM)" in line), None)
    assert stopped is not None, tail(log)
    step = int(re.search(r"checkpoint of step (\d+) saved", stopped).group(1))
    assert 2 <= step < TOTAL and latest(ckpt) == step_name(step), (stopped, latest(ckpt))
    assert (ckpt / step_name(step) / "complete.json").is_file()

    resume_and_finish(command(out, f"checkpoint.save_interval={SAVE_INTERVAL}"), out, env, step)
    assert_same_run(out / "runs" / RUN_NAME, uninterrupted)
