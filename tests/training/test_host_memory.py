"""Host memory of the rollout images: a rank keeps pixels only if it reads them (first pipeline stage),
only for its data-parallel share, as uint8, once per prompt.

The formula (the memory model's ``host_memory``) is checked by hand at the 32B config; the measured
test runs the trainer's experience building and pi_old pass under torchrun (gloo, PP 2 x DP 2) with
small and large images and compares each rank's RSS growth.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from megatron_vgpo.config import load_config
from megatron_vgpo.distributed.layout import parallel_layout
from megatron_vgpo.planning import QWEN25_VL, plan_from_config
from megatron_vgpo.planning.memory import Gpu, host_memory
from tests.conftest import REPO, run_torchrun

MB = 1 << 20


def test_rollout_image_bytes_per_rank_at_the_32b_config():
    """512 prompts x 8 responses, DP 2, 1-megapixel images: a stage-0 rank keeps its 256 prompts' images
    once each as uint8 RGB, 256 x 1e6 x 3 B = 0.77 GB (the issue's target: <= 2 GB; the old layout,
    float32 patches per response on every rank, was ~60 GB); a stage-1 rank keeps none."""
    cfg = load_config(REPO / "examples" / "configs" / "qwen25vl_32b.yaml")
    layout = parallel_layout(cfg.parallel, 32)
    plan = plan_from_config(cfg, layout, Gpu("H100", 80), QWEN25_VL["32B"])
    train = plan.train.__class__(**{**plan.train.__dict__, "image_pixels": 1_000_000})
    stage0 = host_memory(plan.shape, layout, train, 0, plan.engine, cfg.data.rollout_batch_size)
    stage1 = host_memory(plan.shape, layout, train, 1, plan.engine, cfg.data.rollout_batch_size)
    assert stage0["images"] == 256 * 1_000_000 * 3 <= 2e9
    assert stage1["images"] == 0


def _noise_png(side: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _run(tmp_path, hf_dir, sides: tuple[int, ...]) -> list[list[dict]]:
    """One launch measuring each image side in turn: per side, each rank's report in rank order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = []
    for side in sides:
        files.append(tmp_path / f"images_{side}.parquet")
        rows = [{"problem": "<image>How many?", "answer": "1", "images": [{"bytes": _noise_png(side, i), "path": None}]}
                for i in range(8)]
        pq.write_table(pa.Table.from_pylist(rows), files[-1])
    out = tmp_path / "out"
    out.mkdir()
    run_torchrun(REPO / "tests" / "training" / "host_memory_worker.py", 4, hf_dir, out, *files, timeout=600)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
    return [[reports[k] for reports in ranks] for k in range(len(sides))]


@pytest.mark.distributed
@pytest.mark.slow
def test_pixels_stay_on_the_ranks_that_read_them(tmp_path):
    """8 prompts x 4 responses, PP 2 x DP 2, 56 px vs 672 px noise images (0.45 MP, 1.35 MB as uint8).

    Storing the step: a stage-1 rank does not grow at all with the image size; a stage-0 rank grows by
    about its own share of the images (4 prompts, once each; the old layout stored float32 patches per
    response for the whole batch on every rank: 347 MB here). The pi_old pass: both stages grow with
    the sequence length (an image of 672 px is 576 tokens: decoder activations), and stage 0 by at most
    a few micro-batches' worth of patches more than stage 1 (they are made one micro-batch at a time).
    """
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, write_tiny_checkpoint

    model = write_tiny_checkpoint(tmp_path / "tiny", TinyOptions(seed=0))
    small, large = _run(tmp_path, model, (56, 672))  # one launch, the small images first
    share = 4 * 672 * 672 * 3  # this DP rank's 4 prompts, uint8
    micro_batch_patches = 672 * 672 * 24  # float32 patches of one micro-batch (4 rows of one prompt: one image)
    for s, l in zip(small, large):
        print(f"rank {l['rank']} (stage {l['pp_rank']}): stored {s['stored_growth'] / MB:.1f} -> "
              f"{l['stored_growth'] / MB:.1f} MB, pass {s['pass_growth'] / MB:.1f} -> {l['pass_growth'] / MB:.1f} MB "
              f"(56 -> 672 px); pixels kept {l['pixel_bytes'] / MB:.2f} MB")
        assert (l["rows"], l["distinct_prompts"]) == (16, 4)  # whole groups: 4 prompts x 4 responses per DP rank
        if l["pp_rank"] == 0:
            assert l["stored_images"] == 4 and l["pixel_bytes"] == share  # its share, each image once
            assert l["stored_growth"] - s["stored_growth"] < 3 * share + 4 * MB
        else:
            assert l["stored_images"] == 0 and l["pixel_bytes"] == 0
            assert abs(l["stored_growth"] - s["stored_growth"]) < 2 * MB
    for stage0, stage1 in ((0, 2), (1, 3)):  # same DP rank, same rows and sequence lengths
        extra = ((large[stage0]["pass_growth"] - large[stage1]["pass_growth"])
                 - (small[stage0]["pass_growth"] - small[stage1]["pass_growth"]))
        assert extra < 8 * micro_batch_patches, extra
