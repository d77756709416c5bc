"""Run an evaluation: files -> prompts -> responses (vLLM, data-parallel) -> verdicts -> items.jsonl -> table.

    table = run(EvalConfig(model="ckpt", data_root="data/eval"))        # engine=...: a test double

Order, data first: the benchmark files are located (one error names every missing one), a Megatron
model is exported, every file is prepared and checked by ``PromptDataset`` (bad rows skipped,
counted, named); only then the engine and the grading workers start. Per benchmark, the items not
yet in ``items.jsonl`` are generated in batches of ``--batch-size`` prompts, graded and appended
(``store.py``: a restart resumes; greedy decoding and per-item seeds make a resumed run's responses
those of an uninterrupted one).

Under torchrun every rank builds an engine of TP ``--tp``; consecutive ranks form one engine, and the
WORLD_SIZE / tp engines each generate a contiguous share of every batch (``generate_data_parallel``).
Rank 0 prepares the files, grades, writes every output and prints the table; the other ranks only
generate. Sample ``j`` of item ``i`` (its index among the benchmark's usable rows) is seeded with
``seed + i * K + j`` whatever the batching, rank count or restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_vgpo.data.dataset import NoUsableExamplesError, PromptDataset
from megatron_vgpo.data.prompt import PROMPT_TEMPLATE
from megatron_vgpo.evaluation.benchmarks import Benchmark, EvalError, locate, parse_file_overrides, select
from megatron_vgpo.evaluation.config import EvalConfig
from megatron_vgpo.evaluation.formats import prepare
from megatron_vgpo.evaluation.model import context_length, resolve_model
from megatron_vgpo.evaluation.report import write_results
from megatron_vgpo.evaluation.store import ITEMS_FILE, ItemStore, check_settings
from megatron_vgpo.rewards.extract import last_boxed
from megatron_vgpo.rollout import RolloutEngine, RolloutGroups, RolloutRequest, SamplingParams, generate_data_parallel

logger = logging.getLogger(__name__)


@dataclass
class BenchmarkData:
    benchmark: Benchmark
    file: Path
    format: str
    """'sharegpt' or 'easyr1'."""
    rows: int
    """Rows read from the file (all, or the first --limit)."""
    dataset: PromptDataset
    """Its usable rows; ``dataset.skipped`` names the others."""


def init_world() -> tuple[int, bool]:
    """``(rank, created)``: joins torchrun's world when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU)."""
    if dist.is_initialized():
        return dist.get_rank(), False
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), True


def _broadcast(value, rank: int):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def settings_of(cfg: EvalConfig, model_dir: Path) -> dict:
    """What decides the responses and verdicts (a resumed run must match; see ``store.py``)."""
    return {"model": str(Path(cfg.model).absolute()), "model_dir": str(model_dir.absolute()), "dtype": cfg.dtype,
            "samples": cfg.samples, "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed,
            "max_new_tokens": cfg.max_new_tokens, "min_pixels": cfg.min_pixels, "max_pixels": cfg.max_pixels,
            "max_prompt_length": cfg.max_prompt_length, "grader": cfg.grader, "prompt_template": PROMPT_TEMPLATE,
            "prompt_images": "first, <image> removed from the question"}


def fit_context(cfg: EvalConfig, context: Optional[int]) -> EvalConfig:
    """``cfg`` with ``max_prompt_length`` lowered so that prompt + ``max_new_tokens`` fit the model's
    context (vLLM refuses a longer ``max_model_len``); prompts longer than that are skipped."""
    if context is None or cfg.max_prompt_length + cfg.max_new_tokens <= context:
        return cfg
    if cfg.max_new_tokens >= context:
        raise EvalError(f"--max-new-tokens {cfg.max_new_tokens} does not fit the model's context of {context} tokens")
    logger.warning("--max-prompt-length %d + --max-new-tokens %d exceed the model's context (%d tokens): "
                   "prompts are limited to %d tokens", cfg.max_prompt_length, cfg.max_new_tokens, context,
                   context - cfg.max_new_tokens)
    return dataclasses.replace(cfg, max_prompt_length=context - cfg.max_new_tokens)


def load_benchmarks(cfg: EvalConfig, files: dict[str, Path], processor, output: Path, rank: int) -> list[BenchmarkData]:
    from megatron_vgpo.config.schema import DataConfig

    prepared_dir = output / "prepared"
    prepared = {}
    if rank == 0:
        for key, path in files.items():
            prepared[key] = prepare(key, path, Path(cfg.data_root), prepared_dir, cfg.limit)
    prepared = _broadcast(prepared, rank)  # also the other ranks' wait for the files
    data_cfg = DataConfig(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    out = []
    for b in select(files, custom=files):
        fmt, path = prepared[b.key]
        try:
            dataset = PromptDataset([str(path)], data_cfg, processor, cfg.max_prompt_length, PROMPT_TEMPLATE)
        except NoUsableExamplesError as e:
            raise EvalError(f"benchmark {b.key} ({files[b.key]}): {e}") from e
        rows = len(dataset) + len(dataset.skipped)
        if dataset.skipped and rank == 0:
            logger.warning("%s (%s): %d of %d rows skipped %s: %s", b.key, files[b.key], len(dataset.skipped), rows,
                           dataset.skip_counts(), ", ".join(s.row_id for s in dataset.skipped[:20]) +
                           (", ..." if len(dataset.skipped) > 20 else ""))
        out.append(BenchmarkData(b, files[b.key], fmt, rows, dataset))
    return out


def build_engine(cfg: EvalConfig, model_dir: Path) -> RolloutEngine:
    from megatron_vgpo.config.schema import RolloutConfig
    from megatron_vgpo.data.images import processor_size_overrides
    from megatron_vgpo.rollout.vllm_engine import VLLMRolloutEngine

    kv = cfg.kv_cache_memory_bytes
    if kv is None and not torch.cuda.is_available():
        kv = 1 << 30
    rollout = RolloutConfig(tensor_model_parallel_size=cfg.tp, max_prompt_length=cfg.max_prompt_length,
                            max_response_length=cfg.max_new_tokens, gpu_memory_utilization=cfg.gpu_memory_utilization,
                            kv_cache_memory_bytes=kv, enable_sleep_mode=False, enforce_eager=cfg.enforce_eager,
                            seed=cfg.seed)
    return VLLMRolloutEngine(rollout, str(model_dir), dtype=cfg.dtype,
                             mm_processor_kwargs=processor_size_overrides(cfg.min_pixels, cfg.max_pixels))


def build_scorer(cfg: EvalConfig):
    from megatron_vgpo.config.schema import RewardConfig
    from megatron_vgpo.rewards import RewardScorer

    if cfg.grader in ("lookback", "math_verify") and importlib.util.find_spec("math_verify") is None:
        raise EvalError(f"--grader {cfg.grader} needs the math-verify package: pip install math-verify")
    return RewardScorer(RewardConfig(grader=cfg.grader, timeout_s=cfg.grading_timeout,
                                     num_workers=cfg.grading_workers))


def _request(example) -> RolloutRequest:
    return RolloutRequest(example.input_ids.tolist(), example.load_images())


def _batches(pending: list[int], size: int) -> list[list[int]]:
    """Runs of consecutive indices cut into batches of at most ``size`` (a batch's seeds follow from
    its first index only when its items are consecutive)."""
    out: list[list[int]] = []
    for i in pending:
        if out and out[-1][-1] == i - 1 and len(out[-1]) < size:
            out[-1].append(i)
        else:
            out.append([i])
    return out


class Evaluator:
    """Generates, grades and records one benchmark at a time; rank 0 holds the scorer and the store."""

    def __init__(self, cfg: EvalConfig, engine: RolloutEngine, tokenizer, scorer, store: Optional[ItemStore],
                 rank: int):
        self.cfg, self.engine, self.tokenizer, self.rank = cfg, engine, tokenizer, rank
        self.scorer, self.store = scorer, store
        self.groups = RolloutGroups.current(cfg.tp)
        self.sampling = SamplingParams(n=cfg.samples, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       top_p=cfg.top_p if cfg.temperature > 0 else 1.0, seed=cfg.seed)

    def run(self, data: BenchmarkData) -> Optional[dict]:
        """Evaluate the benchmark's missing items; rank 0 returns its summary (all items of this run)."""
        key, ds, k = data.benchmark.key, data.dataset, self.cfg.samples
        ids = self._check_stored(key, ds) if self.rank == 0 else []
        pending = _broadcast([i for i, item_id in enumerate(ids) if not self.store.done(key, item_id, k)]
                             if self.rank == 0 else None, self.rank)
        bar = self._progress(key, len(ds), len(ds) - len(pending))
        todo = set(pending)
        done = [r for i, item_id in enumerate(ids) if i not in todo for r in self.store.samples_of(key, item_id, k)]
        self._show(bar, done)
        for batch in _batches(pending, self.cfg.batch_size):
            examples = [ds[i] for i in batch]
            out = generate_data_parallel(self.engine, examples, self.sampling.shifted(batch[0]), self.groups, _request)
            if self.rank == 0:
                records = self._grade(key, examples, out)
                self.store.append(records)
                done += records
                bar.update(len(batch))
                self._show(bar, done)
        if bar is not None:
            bar.close()
        return self._summary(data, ids) if self.rank == 0 else None

    def _check_stored(self, key: str, ds: PromptDataset) -> list[str]:
        """The item ids; EvalError when a stored item's prompt or label differs from the file's now
        (the benchmark file changed under the output directory: its verdicts would be stale)."""
        ids = []
        for i in range(len(ds)):
            example = ds[i]
            stored = self.store.samples_of(key, example.row_id, self.cfg.samples)
            if stored and (stored[0]["label"], stored[0]["prompt"]) != (example.answer, example.prompt_text):
                raise EvalError(f"{example.row_id}: {self.store.path} holds another prompt or label for this item "
                                f"(label {stored[0]['label']!r}, now {example.answer!r}): the benchmark file changed; "
                                f"use another --output")
            ids.append(example.row_id)
        return ids

    def _grade(self, key: str, examples, out) -> list[dict]:
        texts = self.tokenizer.batch_decode(out.response_token_ids, skip_special_tokens=True)
        ex = [examples[i] for i in out.request_index]
        results = self.scorer.score(texts, [e.answer for e in ex], [{"row_id": e.row_id} for e in ex])
        records, seen = [], {}
        for e, text, res, finish in zip(ex, texts, results, out.finish_reasons):
            j = seen[e.row_id] = seen.get(e.row_id, -1) + 1  # responses of a request are contiguous
            record = {"benchmark": key, "id": e.row_id, "sample": j, "prompt": e.prompt_text, "response": text,
                      "extracted": last_boxed(text), "label": e.answer, "correct": res.accuracy == 1.0,
                      "finish_reason": finish}
            if res.error is not None:
                record["grading_error"] = res.error
            records.append(record)
        return records

    def _progress(self, key: str, total: int, initial: int):
        if self.rank != 0:
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=key, unit="item", file=sys.stderr, dynamic_ncols=True,
                    disable=not self.cfg.progress)

    @staticmethod
    def _show(bar, records: list[dict]) -> None:
        if bar is not None and records:
            bar.set_postfix(acc=f"{100.0 * sum(r['correct'] for r in records) / len(records):.1f}%")

    def _summary(self, data: BenchmarkData, ids: list[str]) -> dict:
        key, k = data.benchmark.key, self.cfg.samples
        records = [r for item_id in ids for r in self.store.samples_of(key, item_id, k)]
        correct = sum(r["correct"] for r in records)
        return {"column": data.benchmark.column, "file": str(data.file), "format": data.format, "rows": data.rows,
                "items": len(ids), "samples": len(records), "correct": correct,
                "accuracy": 100.0 * correct / len(records) if records else None,
                "grading_errors": sum("grading_error" in r for r in records),
                "skipped": data.dataset.skip_counts(),
                "skipped_rows": [{"id": s.row_id, "reason": s.reason, "detail": s.detail}
                                 for s in data.dataset.skipped]}


def run(cfg: EvalConfig, engine: Optional[RolloutEngine] = None) -> Optional[str]:
    """Evaluate ``cfg``; rank 0 writes the outputs and returns the markdown table (other ranks: None).
    ``engine``: a ``RolloutEngine`` to use instead of building the vLLM one (tests)."""
    cfg.validate()
    rank, created = init_world()
    try:
        return _run(cfg, engine, rank)
    finally:
        if created:
            dist.destroy_process_group()


def _run(cfg: EvalConfig, engine: Optional[RolloutEngine], rank: int) -> Optional[str]:
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor

    output = Path(cfg.output or Path("eval_results") / Path(cfg.model).absolute().name)
    overrides = parse_file_overrides(cfg.files)
    files = locate(select(cfg.benchmarks, custom=overrides), cfg.data_root, overrides)
    model_dir = resolve_model(cfg.model, output, cfg.hf_config, rank)
    cfg = fit_context(cfg, context_length(model_dir))
    settings = settings_of(cfg, model_dir)
    if rank == 0:
        check_settings(output, settings)
    processor = load_processor(model_dir)
    data = load_benchmarks(cfg, files, processor, output, rank)  # data first: bad files stop us here
    store = ItemStore(output / ITEMS_FILE) if rank == 0 else None
    owned = engine is None
    with build_scorer(cfg) if rank == 0 else contextlib.nullcontext() as scorer:
        engine = build_engine(cfg, model_dir) if owned else engine
        try:
            evaluator = Evaluator(cfg, engine, processor.tokenizer, scorer, store, rank)
            per_benchmark = {d.benchmark.key: evaluator.run(d) for d in data}
        finally:
            if owned:
                engine.shutdown()
    return write_results(output, per_benchmark, settings, Path(cfg.model).name) if rank == 0 else None
