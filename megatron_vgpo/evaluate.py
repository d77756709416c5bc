"""Evaluate a checkpoint on the paper's benchmarks: ``python -m megatron_vgpo.evaluate --model DIR
--data-root DIR [--benchmarks mathvista geo3k ...] [--output DIR] [--limit N] [--samples K --temperature T]``.

Also under torchrun (``torchrun --nproc-per-node 8 -m megatron_vgpo.evaluate --tp 2 ...``: 4 engines of
TP 2 share every batch). Prints the markdown table (one column per benchmark, Avg-Math, Avg-Vision,
Overall) and writes OUTPUT/items.jsonl, results.json and results.csv; rerunning with the same OUTPUT
resumes. Exit status 2 names a problem with the inputs (a missing benchmark file, a bad option).
See ``megatron_vgpo/evaluation/`` and the README's "Evaluation" section.
"""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_vgpo.evaluation.benchmarks import EvalError
from megatron_vgpo.evaluation.config import add_arguments, from_args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m megatron_vgpo.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from megatron_vgpo.evaluation.runner import run

    try:
        table = run(from_args(args))
    except EvalError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    if table is not None:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
