"""VGPO's cost in the training loop: the same run with VGPO shaping on and off (plain DAPO).

    python tools/bench_vgpo_overhead.py [--steps 12] [--skip 2] [--repeats 2] [--nproc 1]
        [--config examples/configs/cpu_tiny.yaml] [key.sub=value ...]

Runs ``python -m megatron_vgpo.train`` (under torchrun when ``--nproc`` > 1) ``2 x repeats`` times,
alternating ``algorithm.shaping=vgpo`` and ``none`` (order vgpo, none, none, vgpo, ... so that a
drift of the machine's speed cancels), each for ``--steps`` steps without validation or
checkpoints, then reads ``timing_s/*`` back from the TensorBoard files and prints, over the steps
after the first ``--skip`` of each run: the mean time of the step and of each phase (rollout, reward,
log-prob pass, advantages and shaping, update, weight sync) per setting and the ratios VGPO / DAPO (target on the step:
<= 1.02).

Both settings see the same batches: the learning rate is set to 1e-12 by default, so the policy
(and with the seeded sampler, every rollout) stays the same whatever the shaping; the only
difference left is VGPO's work (hidden states kept for the last stage's focus scores, the scores,
the shaping). Pass ``optimizer.lr=...`` to measure learning runs instead. The defaults need vLLM and
the quickstart's files where ``examples/configs/cpu_tiny.yaml`` names them (``bash
examples/quickstart_cpu.sh`` with its default ``OUT=outputs`` writes them there); the config is
resolved and its files checked before the first run starts.
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
PHASES = ("step", "rollout", "reward", "logprob", "advantages", "update", "weight_sync")  # timing_s/* read back


def bench_overrides(args, shaping: str, out: Path) -> list[str]:
    """The trainer's overrides for one run (the user's come last and win)."""
    return [f"algorithm.shaping={shaping}", f"trainer.total_steps={args.steps}", "trainer.val_interval=0",
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
        cfg = load_config(str(config), bench_overrides(args, "vgpo", Path(tempfile.gettempdir())))
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


def run(args, shaping: str, out: Path) -> dict[str, list[float]]:
    from megatron_vgpo.distributed.parallel import free_port
    from megatron_vgpo.training.logging import read_scalars

    overrides = bench_overrides(args, shaping, out)
    launch = [sys.executable, "-m", "megatron_vgpo.train"]
    if args.nproc > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.nproc}",
                  f"--master-port={free_port()}", "-m", "megatron_vgpo.train"]
    cmd = [*launch, "--config", args.config, *overrides]
    print(f"[{shaping}] {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    scalars = read_scalars(out / "runs" / "bench")
    return {tag: [v for step, v in scalars[f"timing_s/{tag}"] if step > args.skip] for tag in PHASES
            if f"timing_s/{tag}" in scalars}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="examples/configs/cpu_tiny.yaml")
    p.add_argument("--steps", type=int, default=12, help="steps per run")
    p.add_argument("--skip", type=int, default=2, help="first steps of each run left out (warm-up)")
    p.add_argument("--repeats", type=int, default=2, help="runs per setting")
    p.add_argument("--nproc", type=int, default=1, help="processes (torchrun) per run")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    if args.steps <= args.skip:
        p.error(f"--steps {args.steps} must exceed --skip {args.skip}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    resolve(args)
    order = [s for i in range(args.repeats) for s in (("vgpo", "none") if i % 2 == 0 else ("none", "vgpo"))]
    times: dict[str, dict[str, list[float]]] = {s: {tag: [] for tag in PHASES} for s in ("vgpo", "none")}
    with tempfile.TemporaryDirectory(prefix="bench_vgpo_") as tmp:
        for i, shaping in enumerate(order):
            for tag, values in run(args, shaping, Path(tmp) / f"run{i}").items():
                times[shaping][tag] += values
    print(f"\n{len(times['vgpo']['step'])} steps per setting ({args.repeats} runs x {args.steps - args.skip}), "
          f"{os.cpu_count()} CPUs, config {args.config} {' '.join(args.overrides)}")
    print(f"{'':>10} {'VGPO s':>9} {'DAPO s':>9} {'ratio':>7}")
    for tag in (t for t in PHASES if times["vgpo"][t] and times["none"][t]):
        on, off = statistics.mean(times["vgpo"][tag]), statistics.mean(times["none"][tag])
        print(f"{tag:>10} {on:9.3f} {off:9.3f} {on / off:7.3f}")


if __name__ == "__main__":
    main()
