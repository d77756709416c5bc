"""The evaluation's settings: one typed dataclass, defaults and help in one place, the CLI built from it.

Decoding defaults are the paper's (METHODS_SPEC 7): greedy (temperature 0), one sample, 2048 new
tokens, images resized into [262144, 1000000] pixels, the Look-Back grader. ``--samples K
--temperature T`` gives avg@k (PAPO/VPPO use K = 8 at T = 1.0).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from megatron_vgpo.evaluation.benchmarks import EvalError
from megatron_vgpo.rewards.graders import GRADERS


@dataclass
class EvalConfig:
    model: str = field(default="", metadata={"help": "Hugging Face Qwen2.5-VL directory, or a Megatron checkpoint "
                                                      "(a training save_dir or step_N/ dir, or hf_to_megatron.py "
                                                      "output), exported to OUTPUT/hf_model first", "required": True})
    benchmarks: list = field(default_factory=lambda: ["all"], metadata={
        "help": "benchmark names (see evaluation/benchmarks.py), comma- or space-separated; all: the ten"})
    data_root: str = field(default=".", metadata={"help": "directory with the benchmark files and their images "
                                                           "(images/ folder or *.zip)"})
    files: list = field(default_factory=list, metadata={"help": "NAME=PATH: a benchmark's file, overriding the "
                                                                 "lookup under --data-root"})
    output: str = field(default="", metadata={"help": "output directory (default eval_results/<model name>); "
                                                       "a rerun resumes from its items.jsonl"})
    grader: str = field(default="lookback", metadata={"help": "answer grader", "choices": sorted(GRADERS)})
    samples: int = field(default=1, metadata={"help": "responses per item (avg@k); > 1 needs --temperature > 0"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling threshold"})
    seed: int = field(default=1, metadata={"help": "sampling seed (sample j of item i uses seed + i * K + j)"})
    max_new_tokens: int = field(default=2048, metadata={"help": "generated tokens at most per response"})
    min_pixels: int = field(default=262144, metadata={"help": "images are resized to at least this many pixels"})
    max_pixels: int = field(default=1000000, metadata={"help": "images are resized to at most this many pixels"})
    max_prompt_length: int = field(default=8192, metadata={
        "help": "prompt tokens at most (image tokens included; lowered to fit the model's context with "
                "--max-new-tokens); longer rows are skipped"})
    limit: Optional[int] = field(default=None, metadata={"help": "evaluate the first N rows of each benchmark"})
    batch_size: int = field(default=128, metadata={"help": "prompts per generation batch (resume granularity)"})
    tp: int = field(default=1, metadata={"help": "rollout engine tensor parallelism; under torchrun the world "
                                                 "is split into WORLD_SIZE / tp data-parallel engines"})
    dtype: str = field(default="bfloat16", metadata={"help": "engine dtype",
                                                     "choices": ["bfloat16", "float16", "float32"]})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "fraction of GPU memory for vLLM"})
    kv_cache_memory_bytes: Optional[int] = field(default=None, metadata={
        "help": "KV cache bytes (CPU needs it; default there 1 GiB)"})
    enforce_eager: bool = field(default=False, metadata={"help": "disable CUDA graphs"})
    hf_config: str = field(default="", metadata={"help": "config/tokenizer/processor directory for a Megatron "
                                                          "checkpoint (default: its hf_config/)"})
    grading_workers: int = field(default=2, metadata={"help": "grading worker processes (0: in this process, "
                                                              "no timeout)"})
    grading_timeout: float = field(default=10.0, metadata={"help": "seconds per grading call; a timeout is wrong"})
    progress: bool = field(default=True, metadata={"help": "progress bars on stderr (--no-progress: none)"})

    def validate(self) -> None:
        if not self.model:
            raise EvalError("--model is required")
        if self.samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1 or self.tp < 1:
            raise EvalError("--samples, --max-new-tokens, --batch-size and --tp must be >= 1")
        if self.samples > 1 and self.temperature <= 0:
            raise EvalError(f"--samples {self.samples} at temperature 0 repeats one greedy response: "
                            f"give --temperature (avg@k uses 1.0)")
        if self.limit is not None and self.limit < 1:
            raise EvalError("--limit must be >= 1")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise EvalError(f"need 0 < --min-pixels <= --max-pixels, got {self.min_pixels}, {self.max_pixels}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per ``EvalConfig`` field, with its default and help."""
    for f in dataclasses.fields(EvalConfig):
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if f.type == "bool":
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        kind = {"int": int, "float": float, "str": str, "Optional[int]": int}.get(f.type)
        kwargs = dict(nargs="+", default=default) if f.type == "list" else dict(type=kind, default=default)
        if meta.get("required"):
            kwargs.pop("default")
        elif default not in ("", None, []):
            help_text += f" (default: {' '.join(default) if isinstance(default, list) else default})"
        parser.add_argument(_flag(f.name), help=help_text, **kwargs, **meta)


def from_args(args: argparse.Namespace) -> EvalConfig:
    cfg = EvalConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig)})
    cfg.validate()
    return cfg
