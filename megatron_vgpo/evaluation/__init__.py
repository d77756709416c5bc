"""Evaluation as the VGPO paper does it: the ten benchmarks of table 1, greedy decoding with the
training prompt, the Look-Back grader, Avg-Math / Avg-Vision / Overall. CLI: ``python -m
megatron_vgpo.evaluate`` (``megatron_vgpo/evaluate.py``).

``benchmarks``: the ten names, their files under ``--data-root``, the missing-file error.
``formats``: sharegpt (PAPO-Eval, Look-Back) and EasyR1 files -> prepared EasyR1 JSONL; images from
folders, zips or embedded bytes; the evaluation prompt.
``model``: an HF directory as is, a Megatron checkpoint exported first.
``store``: ``items.jsonl`` (crash-safe appends, resume) and the settings a resume must match.
``runner``: files -> ``PromptDataset`` -> engine (data-parallel under torchrun) -> grading -> store.
``report``: the aggregate columns, the markdown table, ``results.json`` / ``results.csv``.
``fixtures``: small synthetic benchmark files in the PAPO-Eval layout (tests, README).
"""

from megatron_vgpo.evaluation.benchmarks import BENCHMARKS, Benchmark, EvalError, locate, select
from megatron_vgpo.evaluation.config import EvalConfig
from megatron_vgpo.evaluation.report import averages, fmt, markdown_table

__all__ = ["BENCHMARKS", "Benchmark", "EvalConfig", "EvalError", "averages", "fmt", "locate", "markdown_table",
           "run", "select"]


def __getattr__(name):
    if name == "run":  # lazy: the runner imports torch, the CLI's --help and the report need not
        from megatron_vgpo.evaluation.runner import run
        return run
    raise AttributeError(name)
