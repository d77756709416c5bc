"""torchrun worker for ``test_host_memory.py``: one step's experience and pi_old pass at PP 2 x DP 2, with
the rollout batch's images at a given size; reports each rank's stored pixel bytes and RSS growth.

    torchrun --nproc-per-node 4 tests/training/host_memory_worker.py HF_DIR OUT_DIR DATA.parquet...

Every rank holds the same rollout batch (prompts referring to their dataset rows, responses); the
measured phase is what the trainer does with it: ``RowImages`` for this DP rank's rows (pixels on the
first pipeline stage only) and the pi_old pass through the pipeline. RSS is sampled every 2 ms by a
thread; growth = peak during the phase - RSS just before it. The data files are measured one after
the other in the same launch (smallest images first, so that little freed memory is there to reuse);
every rank writes ``OUT_DIR/rank{r}.json``: its report per file, in order.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoConfig

from megatron_vgpo.config.schema import DataConfig, ModelConfig, OptimizerConfig, ParallelConfig
from megatron_vgpo.data import PromptDataset
from megatron_vgpo.distributed import destroy_parallel, init_parallel
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights
from megatron_vgpo.models.qwen2_5_vl.pixels import PixelSpec
from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor
from megatron_vgpo.training.actor import Actor
from megatron_vgpo.training.experience import build_experience
from megatron_vgpo.training.micro_batch import RowImages
from megatron_vgpo.training.rollout import RolloutStep

N_RESPONSES = 4


class PeakRss:
    def __init__(self):
        self.process, self.peak, self.running = psutil.Process(), 0, True

    def __enter__(self):
        self.start = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.growth = max(self.peak, self.process.memory_info().rss) - self.start


def main(hf_dir: str, out_dir: str, *data_files: str) -> None:
    torch.set_num_threads(1)
    groups = init_parallel(ParallelConfig(pipeline_model_parallel_size=2))
    processor = load_processor(hf_dir)
    chunks = build_policy(AutoConfig.from_pretrained(hf_dir), ModelConfig(params_dtype="float32"), groups)
    load_hf_weights(chunks, hf_dir)
    actor = Actor(chunks, groups, OptimizerConfig(use_distributed_optimizer=False), micro_batch_size=N_RESPONSES,
                  total_steps=1)
    reports = [measure(actor, groups, processor, data_file) for data_file in data_files]
    Path(out_dir, f"rank{groups.rank}.json").write_text(json.dumps(reports))
    destroy_parallel()


def measure(actor, groups, processor, data_file: str) -> dict:
    """This rank's stored pixels and RSS growth for one rollout batch of ``data_file``'s rows."""
    dataset = PromptDataset([data_file], DataConfig(min_pixels=28 * 28, max_pixels=2048 * 2048), processor, 1 << 20)
    step = RolloutStep()
    for g in range(len(dataset)):
        example = dataset[g]
        for _ in range(N_RESPONSES):
            step.prompts.append(example)
            step.responses.append([5, 6, 7])
            step.response_logprobs.append([-1.0] * 3)
            step.group_ids.append(g)
            step.rewards.append(float(g % 2))
        step.group_order.append(g)
    tok = processor.tokenizer
    with PeakRss() as stored:
        rows, _ = step.assignment(len(dataset), groups.dp_rank, groups.dp_size)
        prompts = [step.prompts[r] for r in rows]
        images = RowImages.from_prompts(prompts, PixelSpec.from_processor(processor.image_processor),
                                        load_pixels=groups.is_first_stage)
        exp = build_experience([p.input_ids for p in prompts], [step.responses[r] for r in rows],
                               [step.response_logprobs[r] for r in rows], [step.group_ids[r] for r in rows],
                               [step.rewards[r] for r in rows], images, pad_token_id=tok.pad_token_id or 0,
                               image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"), device=groups.device)
    with PeakRss() as passed:
        actor.forward_statistics(exp)
    return {"rank": groups.rank, "pp_rank": groups.pp_rank, "dp_rank": groups.dp_rank, "rows": len(rows),
              "distinct_prompts": len({p.row_id for p in prompts}), "pixel_bytes": images.nbytes(),
              "stored_images": len(images.pixels) if images.pixels is not None else 0, "stored_growth": stored.growth,
              "pass_growth": passed.growth,
              "pixels_per_image": [int(g[1] * g[2] * 14 * 14) for g in images.grid_thw.tolist()]}


if __name__ == "__main__":
    main(*sys.argv[1:])
