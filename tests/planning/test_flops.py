"""The FLOP model of the pipeline stages (``planning/flops.py``): each formula by hand on a small
shape, the balanced split it chooses, and the example configs' stage imbalance with their split."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_vgpo.config import load_config, validate
from megatron_vgpo.distributed.layout import ParallelLayout, PipelineSplit
from megatron_vgpo.planning import QWEN25_VL, ModelShape, VisionShape, config_plan
from megatron_vgpo.planning import flops as fm
from megatron_vgpo.planning.architectures import decoder_layer_params

REPO = Path(__file__).resolve().parents[2]
VISION = VisionShape(depth=2, hidden_size=8, intermediate_size=16, num_heads=2, out_hidden_size=16, patch_size=2,
                     temporal_patch_size=2, spatial_merge_size=2, in_channels=3, window_size=4,
                     fullatt_block_indexes=(1,))
SMALL = ModelShape("small", num_layers=4, hidden_size=16, ffn_hidden_size=32, num_heads=4, num_kv_heads=2,
                   vocab_size=100, tie_embeddings=False, vision=VISION)
WORK = fm.Workload(micro_batch_size=2, seq_len=4, image_patches=16, images_per_micro_batch=1.5, recompute=True)


def test_formulas_by_hand():
    # Layer: q/k/v 16 x 32 + 32, proj 16 x 16, MLP 3 x 16 x 32, norms 2 x 16 = 2368 parameters;
    # 8 tokens x (2 x 2368 + 4 x 16 x 4) = 39936.
    assert decoder_layer_params(SMALL) == 2368
    assert fm.decoder_layer_flops(SMALL, tokens=8, seq_len=4) == 39936
    # Vision, 16 patches: block 728 parameters -> 2 blocks x 16 x 2 x 728 = 46592; attention 4 x 8 x 16 x
    # (16 keys in the full block 1 + 4 = (4 px / 2 px)^2 in the window block 0) = 10240. Patch embed
    # 2 x 16 x (3 x 2 x 2^2) x 8 = 6144; merger 2 x 16 / 4 x (32^2 + 32 x 16) = 12288.
    assert fm.vision_flops(VISION, 16) == (46592 + 10240, 6144 + 12288)
    assert fm.output_layer_flops(SMALL, 8) == 2 * 16 * 100 * 8


def test_decoder_formula_is_the_mfu_formula():
    from megatron_vgpo.training.logging import flops_per_token

    shape, s = QWEN25_VL["32B"], 6144
    per_token = 3 * shape.num_layers * fm.decoder_layer_flops(shape, tokens=1, seq_len=s)
    assert per_token == flops_per_token(shape.num_layers * decoder_layer_params(shape), shape.num_layers,
                                        shape.hidden_size, s)


def test_stage_flops_by_hand():
    # Per layer x 4 (forward, backward = 2, recompute): 159744. Vision: 1.5 images x (blocks x 4 + rest x 3)
    # = 1.5 x (56832 x 4 + 18432 x 3) = 423936. Output x 3: 76800.
    layout = ParallelLayout(2, 1, 2, 1, split=PipelineSplit(first=1))
    stages = fm.stage_flops(SMALL, layout, WORK)
    assert [(s.layers, s.decoder, s.vision, s.output) for s in stages] == [
        (1, 159744, 423936, 0), (3, 3 * 159744, 0, 76800)]
    assert fm.imbalance(stages) == pytest.approx(583680 / ((583680 + 556032) / 2))
    # TP 2 halves the decoder and the output layer, not the replicated tower; a frozen tower runs forward only.
    tp2 = fm.stage_flops(SMALL, dataclasses.replace(layout, tp=2, world_size=4), WORK)
    assert (tp2[0].decoder, tp2[0].vision, tp2[1].output) == (159744 / 2, 423936, 76800 / 2)
    frozen = fm.stage_flops(SMALL, layout, dataclasses.replace(WORK, freeze_vision=True, recompute=False))
    assert (frozen[0].vision, frozen[0].decoder) == (1.5 * (56832 + 18432), 3 * 39936)


def test_balanced_split_minimises_the_slowest_stage():
    auto = ParallelLayout(2, 1, 2, 1, split=PipelineSplit(first="auto"))
    # stage 0 with 1 layer: 583680 vs 556032; with 2 (even): 743424; with 3: 903168.
    assert fm.balanced_split(SMALL, auto, WORK) == PipelineSplit(first=1)
    both = dataclasses.replace(auto, split=PipelineSplit("auto", "auto"))
    assert fm.balanced_split(SMALL, both, WORK) == PipelineSplit(first=1)  # a tie with last=3: the first wins
    text = dataclasses.replace(WORK, image_patches=0)
    assert fm.balanced_split(SMALL, auto, text) == PipelineSplit()  # no tower: stage 1's output layer is the extra
    assert fm.balanced_split(SMALL, ParallelLayout(1, 1, 1, 1, split=PipelineSplit("auto")), WORK) == PipelineSplit()
    explicit = dataclasses.replace(auto, split=PipelineSplit(first=3))
    assert fm.balanced_split(SMALL, explicit, WORK) == PipelineSplit(first=3)


def test_distinct_images_per_micro_batch_on_average():
    assert [fm.mean_distinct_images(b, 8) for b in (1, 3, 8, 16)] == [1, 10 / 8, 1, 2]
    assert fm.mean_distinct_images(3, 2) == 2  # ceil(3 / 2)


@pytest.mark.parametrize("name,world,layers,even_imbalance", [("qwen25vl_32b.yaml", 32, (20, 44), 1.317),
                                                              ("qwen25vl_72b.yaml", 64, (6, 25, 25, 24), 1.534)])
def test_example_configs_balance_their_stages(name, world, layers, even_imbalance):
    path = REPO / "examples" / "configs" / name
    cfg = load_config(str(path))
    plan = config_plan(cfg, validate(cfg, world), str(path))
    assert tuple(st.layers for st in plan.stages) == tuple(s.layers for s in plan.stage_flops) == layers
    assert fm.imbalance(plan.stage_flops) <= 1.15 and plan.fits
    even = load_config(str(path), ["parallel.first_stage_layers=null", "parallel.last_stage_layers=null"])
    before = config_plan(even, validate(even, world), str(path)).stage_flops
    assert fm.imbalance(before) == pytest.approx(even_imbalance, abs=1e-3)


def test_auto_resolves_in_the_config_checks():
    cfg = load_config(str(REPO / "examples" / "configs" / "qwen25vl_72b.yaml"))
    layout = validate(cfg, 64)
    assert layout.split == PipelineSplit("auto", "auto")  # as configured; the plan and the trainer resolve it
    resolved = fm.resolve_split(cfg, layout, QWEN25_VL["72B"])
    assert resolved.split == PipelineSplit(6, 24) and fm.resolve_split(cfg, resolved, QWEN25_VL["72B"]) is resolved
