"""4 gloo ranks: the dataset scan and the images of three rollout steps, counted per rank.

Layout: the trainer is TP1 x PP2 x DP2 (Megatron's rank order: rank = pp * 2 + dp, so ranks 0 and
1 are the first pipeline stage of DP ranks 0 and 1), the rollout engine TP2 (rollout groups {0, 1}
and {2, 3}). A fake engine stands in for vLLM. Each rank counts the files it scans, every image
decode (``PromptDataset.load_images``: where, for which row, for generation or for training), and
the requests its engine processed; rank 0 writes everyone's counts to ``<out>/<run>.json``.

    python -m torch.distributed.run --nproc-per-node 4 tests/training/rollout_share_worker.py MODEL DATA OUT RUN
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megatron_vgpo.data import PromptDataLoader, PromptDataset  # noqa: E402
from megatron_vgpo.methods.views import ORIGINAL, view_row_images  # noqa: E402
from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor  # noqa: E402
from megatron_vgpo.rollout.data_parallel import RolloutGroups  # noqa: E402
from megatron_vgpo.training.logging import StepTimer  # noqa: E402
from megatron_vgpo.training.rollout import Rollouts  # noqa: E402
from tests.training.fake_rollout import FakeEngine, config  # noqa: E402

STEPS = 3
phase = {"training": False}
scanned: list[str] = []
loads: Counter = Counter()  # (row id, "generate" | "train")


def count_calls() -> None:
    scan_file, load_images = PromptDataset._scan_file, PromptDataset.load_images

    def counting_scan(self, f):
        scanned.append(self.files[f])
        return scan_file(self, f)

    def counting_load(self, i, raw=False):
        # The prefetch thread decodes for generation; the main thread for training while the
        # trainer's experience is built (else: a batch generated without a prefetch).
        training = phase["training"] and threading.current_thread() is threading.main_thread()
        loads[self._kept[i].row_id, "train" if training else "generate"] += 1
        return load_images(self, i, raw)

    PromptDataset._scan_file, PromptDataset.load_images = counting_scan, counting_load


def main(model_dir: str, data_file: str, out_dir: str, run: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 4
    count_calls()
    cfg = config(f"trainer.total_steps={STEPS}", "reward.auto_workers=false", "reward.num_workers=1")
    processor = load_processor(model_dir)
    dataset = PromptDataset([data_file], cfg.data, processor, cfg.rollout.max_prompt_length)
    row_of = {tuple(dataset[i].input_ids.tolist()): dataset[i].row_id for i in range(len(dataset))}
    groups = SimpleNamespace(dp_size=2, dp_rank=rank % 2, is_first_stage=rank < 2)
    engine = FakeEngine()
    loader = PromptDataLoader(dataset, cfg.data.rollout_batch_size, cfg.data.shuffle, cfg.data.seed)
    rollouts = Rollouts(cfg, engine, None, processor, loader, None, groups, RolloutGroups.from_world(rank, world, 2))
    steps = []
    for step in range(STEPS):
        calls_before = len(engine.calls)
        out = rollouts.sample(step, StepTimer(synchronize=False))
        rows, _ = out.assignment(cfg.trainer.global_batch_size, groups.dp_rank, groups.dp_size)
        phase["training"] = True  # what Trainer.compute_logprobs_and_statistics decodes
        view_row_images(ORIGINAL, [out.prompts[r] for r in rows], rows, rollouts.pixel_spec, seed=0, step=step,
                        load_pixels=groups.is_first_stage)
        phase["training"] = False
        steps.append({"calls": [[row_of[p] for p in call] for call in engine.calls[calls_before:]],
                      "trained": sorted({out.prompts[r].row_id for r in rows}),
                      "sampled": out.metrics["batch/sampled_batches"]})
    rollouts.prefetcher.close()
    mine = {"rank": rank, "scanned": scanned, "kept": [k.row_id for k in dataset._kept], "steps": steps,
            "loads": [[row, kind, n] for (row, kind), n in sorted(loads.items())],
            "processed": {row_of[p]: n for p, n in engine.processed.items()}}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        (Path(out_dir) / f"{run}.json").write_text(json.dumps(gathered))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
