"""The cost of each method in the training loop: the same runs with every method of ``methods/`` and with
plain DAPO, on the same batches.

    python tools/bench_methods.py [--methods dapo vgpo entropy vppo papo] [--steps 12] [--skip 2]
        [--repeats 2] [--nproc 1] [--config examples/configs/cpu_tiny.yaml] [key.sub=value ...]

Runs ``python -m megatron_vgpo.train`` (under torchrun when ``--nproc`` > 1) ``repeats`` times per method,
the method order rotated and reversed from one repeat to the next (so that a drift of the machine's
speed cancels), each for ``--steps`` steps without validation or checkpoints; then reads
``timing_s/*`` back from the TensorBoard files and prints, over the steps after the first ``--skip``
of each run, the mean time of the step and of each phase (rollout, reward, log-prob pass, extra
image views, advantages, update, weight sync) per method and its ratio to DAPO's, twice: as measured
(``x DAPO``) and with the phases whose work is the same for every method (rollout, reward, weight
sync) taken at DAPO's time (``x DAPO*``; the rollout's time alone wanders by ~5% between runs of the
same batches on a 2-core machine). ``x DAPO*`` is judged against the target: a method with no extra
view <= 1.02 x DAPO's step; with one extra view <= 1 + (one forward-only pass / step) + 0.02, the
forward-only pass being DAPO's own ``timing_s/logprob`` (the pi_old pass over
the same rows).

Every method sees the same batches: the learning rate is set to 1e-12 by default, so the policy
(and with the seeded sampler, every rollout) stays the same whatever the method; the only
difference left is the method's own work. Pass ``optimizer.lr=...`` to measure learning runs
instead. The defaults need vLLM and the quickstart's files where ``examples/configs/cpu_tiny.yaml``
names them (``bash examples/quickstart_cpu.sh`` with its default ``OUT=outputs`` writes them there);
the config is resolved and its files checked before the first run starts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("step", "rollout", "reward", "logprob", "extra_views", "advantages", "update", "weight_sync")  # timing_s/*
EXTRA_VIEWS = {"dapo": 0, "vgpo": 0, "entropy": 0, "vppo": 1, "papo": 1}  # forward passes beyond the pi_old one


def bench_overrides(args, method: str, out: Path) -> list[str]:
    """The trainer's overrides for one run (the user's come last and win)."""
    from megatron_vgpo.methods import PRESETS

    return [*PRESETS[method], f"trainer.total_steps={args.steps}", "trainer.val_interval=0",
            "trainer.val_before_train=false", f"checkpoint.save_dir={out / 'ckpt'}",
            "checkpoint.save_interval=0", f"logging.tensorboard_dir={out / 'runs'}",
            "logging.run_name=bench", "logging.progress_bar=false", "optimizer.lr=1e-12", *args.overrides]


def resolve(args, root: Path = REPO):
    """The config the runs will use (``args.config`` and the bench's overrides, relative paths taken
    from ``root``, where the runs start), checked before any run: a config error or a missing model
    or data file exits here with what to do, instead of failing inside the first run."""
    from megatron_vgpo.config import ConfigError, load_config, validate

    config = Path(args.config) if Path(args.config).is_absolute() else root / args.config
    try:
        cfg = load_config(str(config), bench_overrides(args, "vppo", Path(tempfile.gettempdir())))
        validate(cfg, args.nproc)
    except ConfigError as e:
        sys.exit(f"config error: {e}")
    needed = [("model.hf_path", cfg.model.hf_path), *(("data.train_files", f) for f in cfg.data.train_files),
              *(("data.val_files", f) for f in cfg.data.val_files)]
    missing = [f"{path} ({key})" for key, path in needed if not (root / path).exists()]
    if missing:
        sys.exit(f"not found: {', '.join(missing)}\nThe defaults run on the quickstart's files: run "
                 "`bash examples/quickstart_cpu.sh` first (default OUT=outputs), or pass model.hf_path=... "
                 "data.train_files=[...] data.val_files=[...]")
    return cfg


def run(args, method: str, out: Path) -> dict[str, list[float]]:
    from megatron_vgpo.distributed.parallel import free_port
    from megatron_vgpo.training.logging import read_scalars

    overrides = bench_overrides(args, method, out)
    launch = [sys.executable, "-m", "megatron_vgpo.train"]
    if args.nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
                  f"--master-port={free_port()}", "-m", "megatron_vgpo.train"]
    cmd = [*launch, "--config", args.config, *overrides]
    print(f"[{method}] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    scalars = read_scalars(out / "runs" / "bench")
    return {tag: [v for step, v in scalars[f"timing_s/{tag}"] if step > args.skip] for tag in PHASES
            if f"timing_s/{tag}" in scalars}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/configs/cpu_tiny.yaml")
    p.add_argument("--methods", nargs="+", choices=sorted(EXTRA_VIEWS), default=list(EXTRA_VIEWS),
                   help="methods to time (DAPO, the reference, is always run)")
    p.add_argument("--steps", type=int, default=12, help="steps per run")
    p.add_argument("--skip", type=int, default=2, help="first steps of each run left out (warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per run")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    if args.steps <= args.skip:
        p.error(f"--steps {args.steps} must exceed --skip {args.skip}")
    args.methods = ["dapo", *[m for m in args.methods if m != "dapo"]]
    return args


def run_order(methods: list[str], repeats: int) -> list[str]:
    """Every method once per repeat, the order rotated by one and reversed every other repeat."""
    order = []
    for i in range(repeats):
        rotated = methods[i % len(methods):] + methods[:i % len(methods)]
        order += rotated[::-1] if i % 2 else rotated
    return order


SHARED = ("rollout", "reward", "weight_sync")
"""Phases whose work is the same for every method on the same batches (the methods act in the log-prob
pass, the extra views, the advantages and the update)."""


def report(times: dict[str, dict[str, list[float]]]) -> list[str]:
    """The table: per method, mean seconds per phase, the step's ratio to DAPO's (``x DAPO``) and the
    ratio with the shared phases (``SHARED``) taken at DAPO's time (``x DAPO*``), judged against the
    target. On a 2-core machine the rollout's own time wanders by ~5% between runs of the same batches,
    as much as the methods' cost: ``x DAPO*`` is the method's cost without that noise."""
    mean = {m: {t: statistics.mean(v) for t, v in phases.items() if v} for m, phases in times.items()}
    dapo = mean["dapo"]
    forward_share = dapo["logprob"] / dapo["step"]
    lines = [f"{'method':>8} " + " ".join(f"{t:>11}" for t in PHASES)
             + f" {'x DAPO':>7} {'x DAPO*':>7} {'target':>7} {'met':>4}"]
    for method, phases in mean.items():
        ratio = phases["step"] / dapo["step"]
        own = phases["step"] + sum(dapo.get(t, 0.0) - phases.get(t, 0.0) for t in SHARED)
        own_ratio = own / dapo["step"]
        target = 1.02 + EXTRA_VIEWS[method] * forward_share
        cells = " ".join(f"{phases[t]:11.3f}" if t in phases else f"{'-':>11}" for t in PHASES)
        lines.append(f"{method:>8} {cells} {ratio:7.3f} {own_ratio:7.3f} {target:7.3f} "
                     f"{'yes' if own_ratio <= target else 'NO':>4}")
    lines.append(f"(one forward-only pass = DAPO's timing_s/logprob = {forward_share:.3f} of its step; "
                 f"x DAPO* = the step with {', '.join(SHARED)} at DAPO's time, the same work for every method)")
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    resolve(args)
    times: dict[str, dict[str, list[float]]] = {m: {tag: [] for tag in PHASES} for m in args.methods}
    with tempfile.TemporaryDirectory(prefix="bench_methods_") as tmp:
        for i, method in enumerate(run_order(args.methods, args.repeats)):
            for tag, values in run(args, method, Path(tmp) / f"run{i}").items():
                times[method][tag] += values
    print(f"\n{len(times['dapo']['step'])} steps per method ({args.repeats} runs x {args.steps - args.skip}), "
          f"{os.cpu_count()} CPUs, config {args.config} {' '.join(args.overrides)}; seconds")
    print("\n".join(report(times)))


if __name__ == "__main__":
    main()
