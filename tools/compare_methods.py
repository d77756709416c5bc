"""Compare methods on a synthetic CPU task: every method trained from the same start with several seeds,
every final checkpoint evaluated and its visual attention analysed; one markdown table and one figure.

    python tools/compare_methods.py --out outputs/compare [--methods dapo vgpo] [--seeds 0 1 2]
        [--task counting|multicount] [--jobs 2] [key.sub=value ...]

1. The start: the quickstart's tiny random model (``tools/make_tiny_qwen25vl.py --seed 0 --init-std
   0.1``) and the task's data (``tools/make_synthetic_dataset.py``), made once in ``OUT/``.
2. Training: ``python -m megatron_vgpo.train`` with the task's config, the method's preset
   (``megatron_vgpo.methods.PRESETS``) and ``trainer.seed = rollout.seed = data.seed = seed``; every run
   from the same model, its TensorBoard logs in ``OUT/tb/<method>_s<seed>``, its final checkpoint in
   ``OUT/ckpt/<method>_s<seed>``. ``--jobs`` runs that many at once (each with ``cpus / jobs`` threads).
   A run whose final checkpoint exists is not run again: the comparison resumes.
3. Evaluation of each final checkpoint (``python -m megatron_vgpo.evaluate``) on the task's validation
   file and its blank-image control, greedy; then the visual-attention analysis
   (``python -m megatron_vgpo.analysis.attention``) of the validation responses.
4. ``OUT/comparison.md`` (and ``.json``): per method, mean and spread (std) over seeds of the final
   validation accuracy (evaluation), the blank control, the accuracy of each part by its position
   (multi-part task), the steps to 50% validation accuracy (training curve), the focus-score late/early
   ratio logged in training (last value), the attention-based and focus-based late/early ratios and the
   focus-vs-image-attention Pearson r (analysis), and the time per step; ``OUT/comparison.png``: the
   validation accuracy against the step, mean and range over seeds, per method, and the blank control.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASKS = {  # task -> (config, generator arguments)
    "counting": ("examples/configs/cpu_tiny.yaml",
                 ["--train", "2048", "--val", "128", "--seed", "0", "--cell", "28", "--max-distractors", "1",
                  "--claims", "8"]),
    "multicount": ("examples/configs/cpu_tiny_forgetting.yaml", ["--task", "multicount", "--seed", "0", "--claims", "8"]),
}
"""Claims (for VAPO) have their own generator: the images and answers are those without them."""


OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.\w+)+=")


def run_name(method: str, seed: int) -> str:
    return f"{method}_s{seed}"


def sh(cmd: list, log: Path | None = None, env: dict | None = None) -> None:
    """Run ``cmd`` from the repository root; stop the comparison with its log on failure."""
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        rc = subprocess.call([str(c) for c in cmd], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    finally:
        if log:
            out.close()
    if rc:
        tail = log.read_text()[-3000:] if log else ""
        sys.exit(f"failed ({rc}): {' '.join(map(str, cmd))}\n{tail}")


def prepare(args) -> tuple[Path, Path]:
    """The tiny model and the task's data in ``OUT`` (made once)."""
    model, data = args.out / "tiny-qwen25vl", args.out / f"data_{args.task}"
    if not (model / "config.json").exists():
        sh([sys.executable, "tools/make_tiny_qwen25vl.py", "--output", model, "--seed", "0", "--init-std", "0.1"])
    if not (data / "train.parquet").exists():
        sh([sys.executable, "tools/make_synthetic_dataset.py", "--output", data, *TASKS[args.task][1]])
    return model, data


def train_commands(args, model: Path, data: Path) -> dict[str, list]:
    """The training command of every run not finished yet."""
    from megatron_vgpo.methods import PRESETS

    cmds = {}
    for method in args.methods:
        for seed in args.seeds:
            name = run_name(method, seed)
            ckpt = args.out / "ckpt" / name
            if (ckpt / "latest").exists() and (args.out / "tb" / name / "done").exists():
                continue
            cmds[name] = [sys.executable, "-m", "megatron_vgpo.train", "--config", TASKS[args.task][0],
                          f"model.hf_path={model}", f"data.train_files=[{data / 'train.parquet'}]",
                          f"data.val_files=[{data / 'val.parquet'}, {data / 'val_blank.parquet'}]",
                          f"logging.tensorboard_dir={args.out / 'tb'}", f"logging.run_name={name}",
                          "logging.progress_bar=false", f"checkpoint.save_dir={ckpt}", "checkpoint.save_interval=0",
                          f"trainer.seed={seed}", f"rollout.seed={seed}", f"data.seed={seed}", *PRESETS[method],
                          *args.overrides]
    return cmds


def run_all(cmds: dict[str, list], args) -> None:
    """``cmds`` with at most ``args.jobs`` at once; each marks its TensorBoard dir ``done``."""
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(REPO)}
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    pending, running = list(cmds.items()), {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name, cmd = pending.pop(0)
            log = open(args.out / "logs" / f"{name}.log", "w")
            print(f"[compare] train {name}", flush=True)
            running[name] = (subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=log,
                                              stderr=subprocess.STDOUT), log, time.monotonic())
        time.sleep(2)
        for name, (proc, log, started) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode:
                sys.exit(f"training {name} failed ({proc.returncode}): see {args.out / 'logs' / (name + '.log')}")
            (args.out / "tb" / name / "done").write_text(f"{time.monotonic() - started:.0f} s\n")
            print(f"[compare] {name} done in {time.monotonic() - started:.0f} s", flush=True)


def evaluate(args, name: str, data: Path, max_new_tokens: int) -> Path:
    out = args.out / "eval" / name
    if not (out / "results.json").exists():
        sh([sys.executable, "-m", "megatron_vgpo.evaluate", "--model", args.out / "ckpt" / name, "--output", out,
            "--files", f"val={data / 'val.parquet'}", f"val_blank={data / 'val_blank.parquet'}",
            "--benchmarks", "val", "val_blank", "--min-pixels", "3136", "--max-pixels", "12544",
            "--max-new-tokens", str(max_new_tokens), "--dtype", "float32", "--enforce-eager",
            "--kv-cache-memory-bytes", str(256 << 20), "--no-progress"], args.out / "logs" / f"{name}.eval.log")
    return out


def analyse(args, name: str, eval_dir: Path) -> Path:
    out = args.out / "analysis" / name
    if not (out / "attention.json").exists():
        items = eval_dir / "items_val.jsonl"  # the validation responses only (not the blank control)
        items.write_text("".join(line + "\n" for line in (eval_dir / "items.jsonl").read_text().splitlines()
                                 if json.loads(line)["benchmark"] == "val"))
        sh([sys.executable, "-m", "megatron_vgpo.analysis.attention", "--model", eval_dir / "hf_model", "--data", items,
            "--output", out, "--device", "cpu", "--dtype", "float32", "--limit", str(args.analysis_limit)],
           args.out / "logs" / f"{name}.analysis.log")
    return out


def run_metrics(args, name: str, data: Path, eval_dir: Path, analysis_dir: Path) -> dict:
    """Every column of the table for one run."""
    from megatron_vgpo.training.logging import read_scalars

    scalars = read_scalars(args.out / "tb" / name)
    curve = scalars.get("val/accuracy/val", [])
    results = json.loads((eval_dir / "results.json").read_text())["benchmarks"]
    summary = json.loads((analysis_dir / "attention.json").read_text())["summary"]["all"]
    steps = [v for _, v in scalars.get("timing_s/step", [])]
    out = {
        "accuracy": results["val"]["accuracy"], "blank": results["val_blank"]["accuracy"],
        "steps_to_50": next((s for s, v in curve if v >= 0.5), float("nan")),
        "focus_late_early_train": scalars["focus/late_early_ratio"][-1][1] if "focus/late_early_ratio" in scalars
        else float("nan"),
        "attention_late_early": (summary.get("attention_late_early_ratio") or {}).get("mean", float("nan")),
        "focus_late_early": summary.get("focus_late_early_ratio", float("nan")),
        "pearson_r": (summary.get("pearson_r") or {}).get("mean", float("nan")),
        "s_per_step": statistics.mean(steps[2:] or steps) if steps else float("nan"),
        "curve": curve, "blank_curve": scalars.get("val/accuracy/val_blank", []),
    }
    out.update(part_accuracy(eval_dir, data))
    return out


def part_accuracy(eval_dir: Path, data: Path) -> dict:
    """Per-position accuracy of the parts (multi-part task; nothing for the counting task)."""
    try:
        from megatron_vgpo.rewards.parts import position_accuracy
    except ImportError:
        return {}
    import pyarrow.parquet as pq

    table = pq.read_table(data / "val.parquet")
    if "parts" not in table.column_names:
        return {}
    parts = table.column("parts").to_pylist()
    rows = [json.loads(line) for line in (eval_dir / "items.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["benchmark"] == "val"]
    accuracy = position_accuracy([r["response"] for r in rows], [parts[int(r["id"].split(":")[1])] for r in rows])
    return {f"part_{i + 1}": 100.0 * a for i, a in enumerate(accuracy)}


COLUMNS = [("accuracy", "val acc %", 1), ("blank", "blank %", 1), ("steps_to_50", "steps to 50%", 0),
           ("focus_late_early_train", "focus late/early (train)", 3), ("attention_late_early", "attn late/early", 3),
           ("focus_late_early", "focus late/early (eval)", 3), ("pearson_r", "Pearson r", 3),
           ("s_per_step", "s/step", 2)]


def _cell(values: list[float], digits: int) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    mean = statistics.mean(values)
    spread = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def table(per_run: dict[str, dict], methods: list[str], seeds: list[int]) -> str:
    parts = sorted({k for m in per_run.values() for k in m if k.startswith("part_")}, key=lambda k: int(k[5:]))
    cols = COLUMNS[:2] + [(p, f"part {p[5:]} %", 1) for p in parts] + COLUMNS[2:]
    lines = ["| method | " + " | ".join(title for _, title, _ in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for method in methods:
        runs = [per_run[run_name(method, s)] for s in seeds]
        lines.append(f"| {method} | " + " | ".join(_cell([r.get(k, float('nan')) for r in runs], d)
                                                  for k, _, d in cols) + " |")
    return "\n".join(lines)


def figure(per_run: dict[str, dict], methods: list[str], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, method in enumerate(methods):
        color = f"C{i}"
        for key, style in (("curve", "-"), ("blank_curve", ":")):
            series = [dict(per_run[run_name(method, s)][key]) for s in seeds]
            steps = sorted(set.intersection(*(set(c) for c in series))) if series else []
            if not steps:
                continue
            values = [[c[t] for c in series] for t in steps]
            ax.plot(steps, [statistics.mean(v) for v in values], style, color=color,
                    label=method if key == "curve" else f"{method} (blank)")
            if key == "curve" and len(seeds) > 1:
                ax.fill_between(steps, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.15)
    ax.set_xlabel("RL step")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    ax.set_title(f"mean and range over seeds {seeds}; dotted: blank-image control")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    from megatron_vgpo.methods import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", nargs="+", default=["dapo", "vgpo"], choices=sorted(PRESETS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--task", choices=sorted(TASKS), default="counting")
    p.add_argument("--jobs", type=int, default=1, help="trainings at once")
    p.add_argument("--analysis-limit", type=int, default=64, help="responses analysed per run")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="to every training run (anywhere)")
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [a for a in argv if OVERRIDE.match(a)]  # wherever they stand: `--seeds 0 1 a.b=1` too
    args = p.parse_args([a for a in argv if not OVERRIDE.match(a)])
    args.overrides = overrides
    args.out = args.out.absolute()
    return args


def main(argv=None) -> None:
    from megatron_vgpo.config import load_config

    args = parse_args(argv)
    started = time.monotonic()
    model, data = prepare(args)
    run_all(train_commands(args, model, data), args)
    max_new_tokens = load_config(str(REPO / TASKS[args.task][0]), args.overrides).rollout.max_response_length
    per_run = {}
    for method in args.methods:
        for seed in args.seeds:
            name = run_name(method, seed)
            eval_dir = evaluate(args, name, data, max_new_tokens)
            per_run[name] = run_metrics(args, name, data, eval_dir, analyse(args, name, eval_dir))
    md = table(per_run, args.methods, args.seeds)
    figure(per_run, args.methods, args.seeds, args.out / "comparison.png")
    (args.out / "comparison.md").write_text(md + "\n")
    (args.out / "comparison.json").write_text(json.dumps(per_run, indent=1) + "\n")
    print(md)
    print(f"\n[compare] {args.out / 'comparison.png'}; {time.monotonic() - started:.0f} s in this invocation")


if __name__ == "__main__":
    main()
