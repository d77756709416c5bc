"""Print TensorBoard scalars of a run as a table and plot them to a PNG (one panel per tag).

    python tools/plot_scalars.py outputs/runs/cpu_tiny val/accuracy/val val/accuracy/val_blank \\
        [--output curve.png]

Reads the event files with ``megatron_vgpo.training.logging.read_scalars`` (no TensorBoard server);
the PNG needs matplotlib (``pip install matplotlib``), the table does not.
"""

from __future__ import annotations

import argparse
import sys

from megatron_vgpo.training.logging import plot_scalars, read_scalars


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logdir", help="a run's TensorBoard directory, e.g. outputs/runs/cpu_tiny")
    p.add_argument("tags", nargs="+", help="scalar tags, e.g. val/accuracy/val")
    p.add_argument("--output", help="PNG to write")
    args = p.parse_args()
    scalars = read_scalars(args.logdir)
    missing = [t for t in args.tags if t not in scalars]
    if missing:
        print(f"{args.logdir} has no scalars {missing}; it has: {', '.join(sorted(scalars))}", file=sys.stderr)
        return 2
    steps = sorted({step for tag in args.tags for step, _ in scalars[tag]})
    values = {tag: dict(scalars[tag]) for tag in args.tags}
    print("step  " + "  ".join(f"{tag:>24}" for tag in args.tags))
    for step in steps:
        print(f"{step:>4}  " + "  ".join(f"{values[t][step]:>24.4f}" if step in values[t] else f"{'':>24}"
                                        for t in args.tags))
    if args.output:
        written = plot_scalars(args.logdir, args.tags, args.output, title=args.logdir)
        print(f"wrote {written}" if written else "no PNG written (matplotlib is not installed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
