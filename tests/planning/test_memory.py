"""The memory model (``megatron_vgpo/planning``): exact parameter counts of the released Qwen2.5-VL
architectures against the transformers model on the meta device, hand-computed values of each
formula, every example config fitting the GPU its header names (and its header block in sync),
and ``tools/plan_memory.py``'s exit codes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vgpo.config import load_config, validate
from megatron_vgpo.distributed.layout import ParallelLayout
from megatron_vgpo.planning import (
    QWEN25_VL, ArchitectureError, Gpu, ModelShape, Reserve, TrainShapes, VisionShape, config_plan, header_gpu,
    header_world_size, render_plan, resolve_shape, shape_from_hf_config, total_params, training_memory,
)
from megatron_vgpo.planning import memory as mm
from megatron_vgpo.planning.architectures import language_model_params, vision_params
from megatron_vgpo.planning.report import plan_block, with_plan_block

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "plan_memory.py"
GPU_EXAMPLES = ["qwen25vl_3b.yaml", "qwen25vl_7b.yaml", "qwen25vl_32b.yaml", "qwen25vl_72b.yaml"]
GiB = 2 ** 30

# The released config.json values, written here independently of the package's table. The vision
# MLP is 3420 wide in the 3B and 7B checkpoints, 3456 (the technical report's value) at 32B and 72B.
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14,
               temporal_patch_size=2, spatial_merge_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
RELEASED = {
    "3B": (dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                intermediate_size=11008, vocab_size=151936), True, {}),
    "7B": (dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064), False, {}),
    "32B": (dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40, num_key_value_heads=8,
                 intermediate_size=27648, vocab_size=152064), False, dict(intermediate_size=3456)),
    "72B": (dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                 intermediate_size=29568, vocab_size=152064), False, dict(intermediate_size=3456)),
}
EXACT_PARAMS = {"3B": 3_754_622_976, "7B": 8_292_166_656, "32B": 33_452_718_336, "72B": 73_410_777_344}


def _hf_config(size: str):
    from transformers import Qwen2_5_VLConfig

    text, tied, vision_overrides = RELEASED[size]
    vision = {**_VISION, "out_hidden_size": text["hidden_size"], **vision_overrides}
    return Qwen2_5_VLConfig(text_config=dict(text), vision_config=vision, tie_word_embeddings=tied)


@pytest.mark.parametrize("size", list(RELEASED))
def test_parameter_counts_are_exact_for_the_released_architectures(size, tmp_path):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_config = _hf_config(size)
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(hf_config)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == EXACT_PARAMS[size]
    shape = shape_from_hf_config(hf_config, name=f"Qwen2.5-VL-{size}")
    assert shape == QWEN25_VL[size]  # the package's table holds the released values
    assert total_params(shape) == counted
    assert vision_params(shape.vision) == sum(p.numel() for p in model.model.visual.parameters())
    # resolve_shape: from config.json (both layouts) when it exists, else from the size in the path.
    hf_config.to_json_file(tmp_path / "config.json")
    assert total_params(resolve_shape(str(tmp_path))) == counted
    flat = {**hf_config.to_dict(), **hf_config.to_dict()["text_config"]}
    flat.pop("text_config")
    (tmp_path / "config.json").write_text(json.dumps(flat))
    assert total_params(resolve_shape(str(tmp_path))) == counted
    assert resolve_shape(f"/nowhere/Qwen2.5-VL-{size}-Instruct") == QWEN25_VL[size]


def test_unknown_architecture_is_a_clear_error(tmp_path):
    with pytest.raises(ArchitectureError, match=r"no config.json there and no released size"):
        resolve_shape("/nowhere/my-model")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ArchitectureError, match=r"has no num_hidden_layers, .*: not a Qwen2.5-VL config"):
        resolve_shape(str(tmp_path))


# ---------------------------------------------------------------------------------- formulas

def test_layer_activations_reproduce_korthikanti_for_gpt():
    s, b, h, a, t = 2048, 2, 1024, 16, 4
    gpt = dict(heads=a, kv_heads=a, ffn=4 * h, flash=False, gated=False, dropout=True)
    sbh = s * b * h
    assert mm.layer_activation_bytes(s, b, h, **gpt) == pytest.approx(sbh * (34 + 5 * a * s / h))
    assert mm.layer_activation_bytes(s, b, h, tp=t, **gpt) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert mm.layer_activation_bytes(s, b, h, tp=t, sp=True, **gpt) == pytest.approx(
        sbh * (34 / t + 5 * a * s / (h * t)))


def test_layer_activations_small_qwen_case_by_hand():
    # s=8, b=2, h=16, a=4, g=2, ffn=32 (f=2), TP 2, flash: replicated 8; divided 2 + 2 + 2 + 8 + 4 + 1 = 19.
    assert mm.layer_activation_bytes(8, 2, 16, 4, 2, 32, tp=2) == 8 * 2 * 16 * (8 + 19 / 2)
    assert mm.layer_activation_bytes(8, 2, 16, 4, 2, 32, tp=2, sp=True) == 8 * 2 * 16 * (27 / 2)
    assert mm.layer_input_bytes(8, 2, 16, tp=2) == 512 and mm.layer_input_bytes(8, 2, 16, tp=2, sp=True) == 256


SMALL_VISION = VisionShape(depth=2, hidden_size=8, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           patch_size=2, temporal_patch_size=2, spatial_merge_size=2, in_channels=3)
SMALL = ModelShape("small", num_layers=2, hidden_size=16, ffn_hidden_size=32, num_heads=4, num_kv_heads=2,
                   vocab_size=100, tie_embeddings=False, vision=SMALL_VISION)


def test_vision_activations_by_hand():
    # block 28 c + 8 J = 224 + 128 = 352; outside: merger 12 c = 96, patches (2 + 4) x 3 x 2 x 2^2 = 144,
    # uint8 image 3 x 2^2 = 12, cos/sin 2 x 4 x c / heads = 32: 284.
    assert mm.vision_activation_bytes(SMALL_VISION, recompute=False) == (2 * 352 + 284, 0)
    assert mm.vision_activation_bytes(SMALL_VISION, recompute=True) == (2 * 2 * 8 + 284, 352)
    assert mm.vision_activation_bytes(SMALL_VISION, recompute=True, frozen=True) == (0, 352)
    real = QWEN25_VL["32B"].vision
    assert mm.image_patches(4194304, real) == 21399
    assert mm.image_patches(4194304, real, max_tokens=4096) == 16384  # a prompt holds 4096 tokens = 16384 patches


def test_logits_kv_cache_and_engine_by_hand():
    assert mm.logits_bytes(10, 101, 2) == 10 * 51 * (2 + 3 * 4)
    assert mm.kv_bytes_per_token(QWEN25_VL["32B"], 8) == 64 * 2 * 1 * 128 * 2
    assert mm.kv_bytes_per_token(QWEN25_VL["32B"], 16) == 64 * 2 * 1 * 128 * 2  # kv heads replicated past TP 8
    assert mm.kv_bytes_per_token(QWEN25_VL["7B"], 2) == 28 * 2 * 2 * 128 * 2
    # decoder 10 x 2 x (4 x 16 + 8 x 4 + 3 x 32) + sampler 2 x 100 x 4 x 3 + encoder 4 x 2 x (4 x 8 + 3 x 16)
    assert mm.engine_activation_bytes(SMALL, tp=1, tokens=10, seqs=2, patches=4) == 3840 + 2400 + 640
    rollout = mm.RolloutShapes(tp=1, gpu_memory_utilization=0.5, max_model_len=64, image_pixels=16,
                               max_num_batched_tokens=10, max_num_seqs=2)
    engine = mm.engine_plan(SMALL, rollout, Gpu(gib=1))
    assert engine.budget == GiB // 2 and engine.weights == total_params(SMALL) * 2
    assert engine.kv_cache == engine.budget - engine.weights - (3840 + 2400 + 640)
    assert engine.kv_tokens == engine.kv_cache // (2 * 2 * 2 * 4 * 2)


def test_micro_batches_in_flight():
    assert [mm.in_flight_micro_batches(4, p, 100) for p in range(4)] == [4, 3, 2, 1]
    assert [mm.in_flight_micro_batches(4, p, 2) for p in range(4)] == [2, 2, 2, 1]
    assert mm.in_flight_micro_batches(4, 0, 100, vpp=2) == 2 * 3 + 4 + 1
    # forwards 0-3 run chunk 0, 4-7 chunk 1, 8-10 chunk 0 of micro-batches 4-6: 7 micro-batches.
    assert mm.first_chunk_in_flight(4, 2, 11) == 7


def test_distinct_images_per_micro_batch():
    assert [mm.distinct_images(b, 8) for b in (1, 4, 8, 12, 16, 64)] == [1, 1, 1, 2, 2, 8]
    assert mm.distinct_images(3, 2) == 2  # rows 0-2 span groups 0-1, rows 3-5 groups 1-2
    assert mm.distinct_images(5, 2) == 3  # rows 0-4: groups 0-2
    cfg = load_config(str(REPO / "examples" / "configs" / "qwen25vl_7b.yaml"), ["trainer.micro_batch_size=12"])
    plan = config_plan(cfg, validate(cfg, 8))
    assert plan.train.images_per_micro_batch == 2


def test_training_state_and_partition():
    one = ParallelLayout(1, 1, 1, 1)
    train = TrainShapes(micro_batch_size=1, seq_len=8, image_pixels=0)
    mem = training_memory(SMALL, one, train, 0)
    n = total_params(SMALL)
    assert (mem["weights"], mem["grads fp32"], mem["optimizer"]) == (2 * n, 4 * n, 12 * n)
    full = mm.layer_activation_bytes(8, 1, 16, 4, 2, 32)
    assert mem["decoder act"] == int(2 * full + full + 2 * mm.layer_input_bytes(8, 1, 16))
    assert mem["logits"] == mm.logits_bytes(8, 100, 1) and mem["vision act"] == 0
    assert mem["reserve"] == int(2 * GiB + 0.05 * (mem.total - mem["reserve"]))  # context 1.5 + 1 communicator
    assert mem.total_without("reserve") == mem.total - mem["reserve"]
    dp4 = ParallelLayout(4, 1, 1, 4)
    assert training_memory(SMALL, dp4, train, 0)["optimizer"] == 12 * n // 4
    fp32 = dataclasses.replace(train, params_bytes=4)
    assert training_memory(SMALL, one, fp32, 0)["optimizer"] == 8 * n  # no separate master copy
    # Stages: the embedding and the tower on stage 0, the output layer last; a tied model's last stage
    # keeps a copy of the embedding when PP > 1.
    pp2 = ParallelLayout(2, 1, 2, 1)
    assert sum(sum(mm.stage_params(SMALL, pp2, p)) for p in range(2)) == n
    tied = dataclasses.replace(SMALL, tie_embeddings=True)
    assert sum(mm.stage_params(tied, one, 0)) == total_params(tied) == language_model_params(tied) + vision_params(
        SMALL_VISION)
    assert sum(sum(mm.stage_params(tied, pp2, p)) for p in range(2)) == total_params(tied) + 100 * 16


# --------------------------------------------------------------------------------- examples

@pytest.mark.parametrize("name", GPU_EXAMPLES)
def test_every_example_fits_the_gpu_its_header_names(name):
    path = REPO / "examples" / "configs" / name
    gpu, world = header_gpu(str(path)), header_world_size(str(path))
    assert gpu is not None and world is not None, f"{name}: '# gpu:' / '# world size:' header lines"
    cfg = load_config(str(path))
    plan = config_plan(cfg, validate(cfg, world), str(path))
    assert plan.gpu == gpu and plan.fits, render_plan(plan)
    assert plan_block(path.read_text()) == render_plan(plan), (
        f"the memory plan in {name}'s header is stale: python tools/plan_memory.py --config {path} --write")


def test_cpu_config_has_no_gpu_plan():
    cfg = load_config(str(REPO / "examples" / "configs" / "cpu_tiny.yaml"))
    assert config_plan(cfg, validate(cfg, 1)) is None


def test_plan_block_round_trip():
    text = "# title\n# gpu: X 8GB\nmodel:\n  hf_path: x\n"
    written = with_plan_block(text, "a\nb | c")
    assert written.startswith("# title\n# gpu: X 8GB\n# memory-plan:begin")
    assert written.endswith("# memory-plan:end\nmodel:\n  hf_path: x\n")
    assert plan_block(written) == "a\nb | c"
    assert plan_block(with_plan_block(written, "d")) == "d"


def test_reserve_numbers_are_the_documented_ones():
    assert Reserve() == Reserve(cuda_context_gib=1.5, nccl_gib_per_communicator=0.5, fragmentation=0.05,
                                cuda_graphs_gib=1.0, engine_asleep_gib=0.25, host_process_gib=6.0)


# ------------------------------------------------------------------------------------- CLI

def _tool_main():
    spec = importlib.util.spec_from_file_location("plan_memory_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_cli_exit_codes(tmp_path, capsys):
    main = _tool_main()
    config = str(REPO / "examples" / "configs" / "qwen25vl_32b.yaml")
    assert main(["--config", config]) == 0
    assert "| stage |" in capsys.readouterr().out
    assert main(["--config", config, "--world-size", "32", "trainer.micro_batch_size=64"]) == 1
    assert "DOES NOT FIT: stage 0 training" in capsys.readouterr().out
    assert main(["--config", config, "--gpu-gb", "40"]) == 1
    assert main(["--config", config, "--world-size", "12"]) == 2
    assert "world size 12 is not divisible" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  hf_path: /nowhere/my-model\n")
    assert main(["--config", str(broken), "--world-size", "1"]) == 2
    assert "no released size" in capsys.readouterr().err
    broken.write_text("model:\n  hf_pth: x\n")
    assert main(["--config", str(broken), "--world-size", "1"]) == 2
    assert main(["--config", str(REPO / "examples" / "configs" / "cpu_tiny.yaml"), "--world-size", "1"]) == 0
    assert "CPU run" in capsys.readouterr().out


def test_cli_process_exit_status_and_dry_run():
    config = "examples/configs/qwen25vl_7b.yaml"
    r = subprocess.run([sys.executable, str(TOOL), "--config", config, "trainer.micro_batch_size=64"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "DOES NOT FIT" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "megatron_vgpo.train", "--config", config, "--dry-run",
                        "--world-size", "8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "# memory plan\n# Qwen2.5-VL-7B: 8.29B params" in r.stdout and "\n# fits\n" in r.stdout
