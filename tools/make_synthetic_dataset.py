"""Write the synthetic counting task (train / val / blank-image val) as parquet in the EasyR1 schema.

    python tools/make_synthetic_dataset.py --output data/synthetic [--train 1024 --val 128 --seed 0 --size 56]

"How many red circles are in the image?" among blue circles and red squares; answers uniform over
--min-count..--max-count, so chance accuracy is 1/K. The logic lives in
``megatron_vgpo.data.synthetic`` (see its docstring); the same options give the same rows.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from megatron_vgpo.data.synthetic import SyntheticOptions, write_synthetic_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = SyntheticOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="directory for train/val/val_blank.parquet")
    p.add_argument("--train", type=int, default=1024, help="training rows")
    p.add_argument("--val", type=int, default=128, help="validation rows (also the blank-image control)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes")
    p.add_argument("--size", type=int, default=d.size, help="image side in pixels (multiple of 28)")
    p.add_argument("--cell", type=int, default=d.cell, help="grid cell side in pixels, one object per cell")
    p.add_argument("--min-count", type=int, default=d.min_count, help="smallest answer")
    p.add_argument("--max-count", type=int, default=d.max_count, help="largest answer")
    p.add_argument("--max-distractors", type=int, default=d.max_distractors, help="distractors per image at most")
    p.add_argument("--all-targets", action="store_true", help="ask about any colour x shape, not only red circles")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    opts = SyntheticOptions(size=args.size, cell=args.cell, min_count=args.min_count, max_count=args.max_count,
                            max_distractors=args.max_distractors, all_targets=args.all_targets)
    try:
        paths = write_synthetic_dataset(args.output, args.train, args.val, args.seed, opts)
    except ValueError as e:
        print(f"make_synthetic_dataset: error: {e}", file=sys.stderr)
        return 2
    import pyarrow.parquet as pq

    for name, path in paths.items():
        answers = Counter(pq.read_table(path, columns=["answer"]).column("answer").to_pylist())
        print(f"wrote {path}: {sum(answers.values())} rows, answers {dict(sorted(answers.items()))}")
    print(f"chance accuracy: 1/{opts.num_answers} = {1 / opts.num_answers:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
