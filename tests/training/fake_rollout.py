"""A fake rollout engine and a small ``Rollouts`` set-up for the sampling-loop tests: no vLLM, no
Megatron, the tiny checkpoint's processor, a dataset whose prompts are all different."""

from __future__ import annotations

import hashlib
import io
import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from megatron_vgpo.rollout.types import RolloutBatch

REPO = Path(__file__).resolve().parents[2]
OVERRIDES = ("data.rollout_batch_size=4", "trainer.global_batch_size=2", "rollout.n=2", "rollout.max_response_length=8",
             "algorithm.dynamic_sampling.enable=true", "algorithm.dynamic_sampling.max_batches=4",
             "trainer.total_steps=3", "reward.custom_fn=tests.training.hash_reward:reward", "reward.format_weight=0.0",
             "data.min_pixels=3136", "data.max_pixels=12544")


def write_data(path: Path, rows: int) -> Path:
    """``rows`` prompts, each with its own text and its own image (a colour per row)."""
    def png(i):
        buf = io.BytesIO()
        Image.new("RGB", (56 + 28 * (i % 3), 56), (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(buf, format="PNG")
        return buf.getvalue()

    table = [{"problem": f"<image>How many things in picture {i}?", "answer": str(i % 4),
              "images": [{"bytes": png(i), "path": None}]} for i in range(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(table), path)
    return path


def config(*overrides: str):
    from megatron_vgpo.config import load_config

    return load_config(None, [*OVERRIDES, *overrides])


class FakeEngine:
    """Responses drawn from ``(seed, prompt)``: sample ``j`` of request ``i`` uses ``seed + i * n + j``,
    as vLLM's per-request seeds do. Records each call's requests (by prompt) and the images it
    processed (one processor call per request: its ``n`` samples share it)."""

    def __init__(self, vocab: range = range(10, 200)):
        self.vocab = vocab
        self.calls: list[list[tuple[int, ...]]] = []
        self.processed: Counter = Counter()

    def generate(self, requests, sampling) -> RolloutBatch:
        out = RolloutBatch([], [], [], [], [])
        self.calls.append([tuple(r.prompt_token_ids) for r in requests])
        for i, request in enumerate(requests):
            prompt = tuple(request.prompt_token_ids)
            self.processed[prompt] += len(request.images)
            digest = hashlib.sha256(repr(prompt).encode()).hexdigest()[:12]
            for j in range(sampling.n):
                rng = random.Random(f"{sampling.seed + i * sampling.n + j}/{digest}")
                length = rng.randint(1, sampling.max_tokens)
                out.request_index.append(i)
                out.prompt_token_ids.append(list(prompt))
                out.response_token_ids.append([rng.choice(self.vocab) for _ in range(length)])
                out.response_logprobs.append([-rng.random() for _ in range(length)])
                out.finish_reasons.append("length" if length == sampling.max_tokens else "stop")
        return out

    def sleep(self, level: int = 1) -> None:
        pass

    def wake_up(self, tags=None) -> None:
        pass

    def update_weights(self, weights) -> None:
        pass

    def reset_caches(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


def comparable(step) -> dict:
    """A ``RolloutStep`` as plain values (prompts by row id)."""
    return {"rows": [p.row_id for p in step.prompts], "responses": step.responses,
            "logprobs": step.response_logprobs, "group_ids": step.group_ids, "rewards": step.rewards,
            "group_order": step.group_order, "metrics": step.metrics}
