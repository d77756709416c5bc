"""Shared test fixtures: a tiny random Qwen2.5-VL built in code, and a torchrun launcher.

The tiny model is the real ``Qwen2_5_VLForConditionalGeneration``, narrow and shallow: 4 decoder
layers of width 128 with GQA (4 heads, 2 kv heads, head_dim 32), an odd vocabulary (301: TP=2 must
pad it), M-RoPE sections (4, 6, 6); a depth-4 vision tower with window attention in blocks 0 and 2
and full attention in 1 and 3 (window 56 px = 2 x 2 merged tokens, so the 6 x 8 test image spans
several windows). EVERY tensor is random, norms (around 1) and biases included, with std 0.1 so
that attention is far from uniform: a swapped, dropped or mis-sliced tensor, or a wrong rotary
section, moves the outputs by 1e-2 or more instead of hiding below the 1e-5 tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import megatron_vgpo  # noqa: F401  (first: installs the torchvision shim before anything imports torchvision)

REPO = Path(__file__).resolve().parents[1]
TINY_STD = 0.1


def tiny_hf_config(tie_word_embeddings: bool = False, **text_overrides):
    from transformers import Qwen2_5_VLConfig

    text = dict(vocab_size=301, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                initializer_range=TINY_STD, bos_token_id=None, eos_token_id=None,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 6, 6]))
    text.update(text_overrides)
    vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                  fullatt_block_indexes=[1, 3], initializer_range=TINY_STD)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=290, video_token_id=291,
                            vision_start_token_id=288, vision_end_token_id=289,
                            tie_word_embeddings=tie_word_embeddings)


@torch.no_grad()
def tiny_hf_model(config, seed: int = 0):
    """The HF model of ``config`` with every parameter random (see the module docstring)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen) * TINY_STD
        is_norm = param.dim() == 1 and ("norm" in name or "ln_q" in name)
        param.copy_(1.0 + noise if is_norm else noise)
    return model


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory) -> dict[str, Path]:
    """``{"untied": dir, "tied": dir}``: tiny random HF checkpoints saved with ``save_pretrained``."""
    dirs = {}
    for kind, tie in (("untied", False), ("tied", True)):
        path = tmp_path_factory.mktemp(f"tiny_{kind}")
        tiny_hf_model(tiny_hf_config(tie_word_embeddings=tie), seed=1 + tie).save_pretrained(path)
        dirs[kind] = path
    return dirs


def run_torchrun(script, nproc: int, *args, timeout: int = 300) -> str:
    """Run ``script`` under ``torchrun --nproc-per-node nproc`` (gloo, a free port); return its
    output, failing the test with that output if it exits non-zero or runs past ``timeout`` s."""
    from megatron_vgpo.distributed.parallel import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(script), *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd)} timed out after {timeout}s:\n{e.stdout}\n{e.stderr}")
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-6000:]}")
    return output


@pytest.fixture
def world_of_one():
    """A single-process Megatron world (TP = PP = 1, gloo); torn down after the test."""
    from megatron_vgpo.config.schema import ParallelConfig
    from megatron_vgpo.distributed import destroy_parallel, init_parallel

    groups = init_parallel(ParallelConfig())
    yield groups
    destroy_parallel()
