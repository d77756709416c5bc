"""Write small benchmark files in the PAPO-Eval layout (sharegpt JSON + images folder or zip, optionally an
EasyR1 parquet copy) for the ten benchmark names, from the synthetic counting task, fully offline.

    python tools/make_eval_fixtures.py --output data/eval_fixtures [--rows 4] [--zip] [--easyr1] [--bad-rows]
    python -m megatron_vgpo.evaluate --model MODEL --data-root data/eval_fixtures

The layout and the rows are described in ``megatron_vgpo/evaluation/fixtures.py``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_vgpo.evaluation.benchmarks import EvalError, select
from megatron_vgpo.evaluation.fixtures import write_eval_fixtures


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="directory to write into (the evaluation's --data-root)")
    p.add_argument("--rows", type=int, default=4, help="rows per benchmark")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes")
    p.add_argument("--benchmarks", nargs="+", default=["all"], help="benchmark names (default: all ten)")
    p.add_argument("--zip", action="store_true", help="images in <split>_images.zip archives instead of images/")
    p.add_argument("--easyr1", action="store_true", help="also write easyr1/<name>.parquet (EasyR1 schema)")
    p.add_argument("--bad-rows", action="store_true", help="append 4 rows to geo3k that the evaluation must skip")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        keys = [b.key for b in select(args.benchmarks)]
    except EvalError as e:
        print(f"make_eval_fixtures: error: {e}", file=sys.stderr)
        return 2
    written = write_eval_fixtures(args.output, args.rows, args.seed, keys, zipped=args.zip, easyr1=args.easyr1,
                                  bad_rows=args.bad_rows)
    print(f"wrote {len(written)} benchmark files ({args.rows} rows each) under {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
