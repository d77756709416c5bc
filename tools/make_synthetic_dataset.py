"""Write a synthetic task (train / val / blank-image val) as parquet in the EasyR1 schema.

    python tools/make_synthetic_dataset.py --output data/synthetic [--train 1024 --val 128 --seed 0 --size 56]
    python tools/make_synthetic_dataset.py --output data/multicount --task multicount [--parts 3 --max-count 1]
    ... --task multicount --max-count 2 --random-order --size 84   (harder: not learned in 200 CPU steps)
    ... --claims 20     (C claims about each image with CORRECT/WRONG labels, for VAPO)

``--task count`` (default): "How many red circles are in the image?" among blue circles and red
squares; answers uniform over --min-count..--max-count, so chance accuracy is 1/K.
``--task multicount``: "Count the red circles, then the blue squares, then the green triangles. Answer
their total."; each part's count uniform per position, the per-part counts in the ``parts`` column.
Options left out take the task's defaults. The logic lives in ``megatron_vgpo.data.synthetic`` (see
its docstring); the same options give the same rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import Counter

from megatron_vgpo.data.synthetic import MulticountOptions, SyntheticOptions, write_synthetic_dataset

TASKS = {"count": SyntheticOptions, "multicount": MulticountOptions}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="directory for train/val/val_blank.parquet")
    p.add_argument("--task", choices=sorted(TASKS), default="count", help="which task (default: count)")
    p.add_argument("--train", type=int, default=1024, help="training rows")
    p.add_argument("--val", type=int, default=128, help="validation rows (also the blank-image control)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes")
    # None = the task's default (its options dataclass holds them).
    p.add_argument("--size", type=int, help="image side in pixels (multiple of 28); 56")
    p.add_argument("--cell", type=int, help="grid cell side in pixels, one object per cell; count 14, multicount 28")
    p.add_argument("--min-count", type=int, help="smallest answer (count) or part count (multicount); 0")
    p.add_argument("--max-count", type=int, help="largest answer (count: 3) or part count (multicount: 1)")
    p.add_argument("--max-distractors", type=int, help="distractors per image at most; count 4, multicount 0")
    p.add_argument("--all-targets", action="store_true", default=None,
                   help="count: ask about any colour x shape, not only red circles")
    p.add_argument("--parts", type=int, help="multicount: kinds counted per row (default 3)")
    order = p.add_mutually_exclusive_group()
    order.add_argument("--random-order", dest="shuffle_parts", action="store_true", default=None,
                       help="multicount: name the parts in an order drawn per row")
    order.add_argument("--fixed-order", dest="shuffle_parts", action="store_false", default=None,
                       help="multicount: name the parts in the same order in every row (the default)")
    p.add_argument("--claims", type=int, help="claims about each image per row (claim_i/label_i), 0 = none")
    return p.parse_args(argv)


def task_options(args: argparse.Namespace):
    """The task's options from the given flags; a flag the task does not have is an error."""
    cls = TASKS[args.task]
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in vars(args).items()
             if v is not None and k not in ("output", "task", "train", "val", "seed")}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"--task {args.task} has no option {', '.join('--' + u.replace('_', '-') for u in unknown)}")
    return cls(**given)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        opts = task_options(args)
        paths = write_synthetic_dataset(args.output, args.train, args.val, args.seed, opts)
    except ValueError as e:
        print(f"make_synthetic_dataset: error: {e}", file=sys.stderr)
        return 2
    import pyarrow.parquet as pq

    for name, path in paths.items():
        answers = Counter(pq.read_table(path, columns=["answer"]).column("answer").to_pylist())
        print(f"wrote {path}: {sum(answers.values())} rows, answers {dict(sorted(answers.items(), key=lambda kv: int(kv[0])))}")
    if isinstance(opts, MulticountOptions):
        total = Counter(pq.read_table(paths["val"], columns=["answer"]).column("answer").to_pylist())
        print(f"chance accuracy: a part 1/{opts.num_counts} = {1 / opts.num_counts:.3f}; the total, by always "
              f"answering the most frequent val total, {max(total.values()) / sum(total.values()):.3f}")
    else:
        print(f"chance accuracy: 1/{opts.num_answers} = {1 / opts.num_answers:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
