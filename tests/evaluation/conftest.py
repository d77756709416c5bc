"""Fixtures of the evaluation tests: a tiny checkpoint (its tokenizer and processor), a fake engine that
answers from a table, hand-written benchmark files in both formats, and a small ``EvalConfig``."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_vgpo.data.prompt import INSTRUCTION
from megatron_vgpo.evaluation import EvalConfig
from megatron_vgpo.rollout import RolloutBatch, RolloutRequest, SamplingParams

SMALL_PIXELS = dict(min_pixels=56 * 56, max_pixels=112 * 112)  # 56x56 images stay 4 image tokens


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("eval_model") / "tiny", TinyOptions(seed=0, init_std=0.1))


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor

    return load_processor(tiny_model).tokenizer


class FakeEngine:
    """A ``RolloutEngine`` that answers every request from ``respond(prompt_text, sample_index)``.

    It records what it was asked (``calls``: per generate call, the decoded prompts and per-request
    seeds) and can fail on a given call (``fail_on``: a stand-in for a killed run)."""

    def __init__(self, tokenizer, respond: Callable[[str, int], str], fail_on: int | None = None):
        self.tokenizer, self.respond, self.fail_on = tokenizer, respond, fail_on
        self.calls: list[list[tuple[str, int | None]]] = []

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> RolloutBatch:
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise RuntimeError("engine killed (test)")
        batch = RolloutBatch([], [], [], [], [])
        call = []
        for i, req in enumerate(requests):
            prompt = self.tokenizer.decode(req.prompt_token_ids, skip_special_tokens=False)
            call.append((prompt, None if sampling.seed is None else sampling.seed + i * sampling.n))
            for j in range(sampling.n):
                ids = self.tokenizer(self.respond(prompt, j), add_special_tokens=False)["input_ids"]
                batch.request_index.append(i)
                batch.prompt_token_ids.append(list(req.prompt_token_ids))
                batch.response_token_ids.append(ids)
                batch.response_logprobs.append([0.0] * len(ids))
                batch.finish_reasons.append("stop")
        self.calls.append(call)
        return batch

    def update_weights(self, weights) -> None: ...
    def reset_caches(self) -> None: ...
    def sleep(self, level: int = 1) -> None: ...
    def wake_up(self, tags=None) -> None: ...
    def shutdown(self) -> None: ...


def table_responder(table: dict[str, object]) -> Callable[[str, int], str]:
    """``respond`` for ``FakeEngine``: the response (or the list of per-sample responses) of the one
    question of ``table`` that the prompt contains."""
    def respond(prompt: str, j: int) -> str:
        hits = [q for q in table if q in prompt]
        assert len(hits) == 1, f"prompt matches {hits}: {prompt!r}"
        answer = table[hits[0]]
        return answer[j] if isinstance(answer, list) else answer
    return respond


def png(color=(200, 30, 30), size=56) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def write_sharegpt(root: Path, key: str, rows: list[tuple[str, str]], folder: str | None = None) -> Path:
    """``rows`` of (``<image>`` question, label) as a PAPO-Eval file ``root/key.json`` whose images are
    ``root/images/<folder>/<n>.png`` (questions without ``<image>`` still get one image)."""
    folder = folder or key
    data = []
    for n, (question, label) in enumerate(rows):
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        (root / "images" / folder / f"{n}.png").write_bytes(png((40 * n % 256, 90, 160)))
        data.append({"messages": [{"role": "user", "content": f"{question} {INSTRUCTION}"},
                                  {"role": "assistant", "content": label}],
                     "images": [f"./data/images/{folder}/{n}.png"]})
    path = root / f"{key}.json"
    path.write_text(json.dumps(data))
    return path


def write_easyr1(path: Path, rows: list[tuple[str, str]]) -> Path:
    """The same rows in the EasyR1 schema, images embedded as ``{bytes, path}`` structs."""
    table = [{"problem": q, "answer": a, "images": [{"bytes": png((40 * n % 256, 90, 160)), "path": None}]}
             for n, (q, a) in enumerate(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table), path)
    return path


def eval_config(model: Path, data_root: Path, output: Path, **kw) -> EvalConfig:
    """Small and quick: tiny pixel bounds, in-process grading, no progress bar."""
    return EvalConfig(**{"model": str(model), "data_root": str(data_root), "output": str(output),
                         "grading_workers": 0, "progress": False, "max_prompt_length": 512, **SMALL_PIXELS, **kw})
