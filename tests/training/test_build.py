"""``build_trainer`` refuses, by name and before any process group or model exists, the settings the
trainer does not implement (instead of silently ignoring them)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_vgpo.config import load_config
from megatron_vgpo.training.build import build_trainer
from tests.conftest import REPO


def test_unimplemented_settings_are_refused_by_name():
    cfg = load_config(REPO / "examples" / "configs" / "cpu_tiny.yaml", ["algorithm.kl_coef=0.01"])
    with pytest.raises(ValueError, match="algorithm.kl_coef"):
        build_trainer(object, cfg)
    assert not dist.is_initialized()


def test_trainer_device_is_resolved_and_refused_by_name():
    """``trainer.device``: 'auto' and 'cpu' give the CPU on a machine without CUDA; 'cuda' is refused there,
    by name, before any process group exists."""
    from megatron_vgpo.utils.device import resolve_device

    assert not torch.cuda.is_available()  # CI's machine
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(ValueError, match="trainer.device=cuda"):
        resolve_device("cuda")
    cfg = load_config(REPO / "examples" / "configs" / "cpu_tiny.yaml", ["trainer.device=cuda"])
    with pytest.raises(ValueError, match="trainer.device=cuda"):
        build_trainer(object, cfg)
    assert not dist.is_initialized()


def _tiny_run_config(tmp_path, model, *overrides):
    from megatron_vgpo.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", train=8, val=4, seed=0)
    return load_config(REPO / "examples" / "configs" / "cpu_tiny.yaml", [
        f"model.hf_path={model}", f"data.train_files=[{tmp_path / 'data' / 'train.parquet'}]", "data.val_files=[]",
        f"checkpoint.save_dir={tmp_path / 'ckpt'}", f"logging.tensorboard_dir={tmp_path / 'runs'}",
        "trainer.format_warmup.steps=0", "data.rollout_batch_size=2", "trainer.global_batch_size=2", *overrides])


def test_model_megatron_path_initialises_the_policy_instead_of_hf_path(tmp_path):
    """The policy starts from the Megatron checkpoint of another model (same config): its weights are that
    model's, not those of ``model.hf_path`` (which still gives the config, tokenizer and processor); the
    trainer's device is the one ``trainer.device`` names."""
    from safetensors.torch import load_file

    from megatron_vgpo.checkpoint.convert import hf_to_megatron
    from megatron_vgpo.distributed import destroy_parallel
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, write_tiny_checkpoint
    from megatron_vgpo.rollout.weight_sync import hf_state_dict_of
    from megatron_vgpo.trainer import Trainer
    from tests.training.test_colocation import RecordingEngine

    hf_model = write_tiny_checkpoint(tmp_path / "a", TinyOptions(seed=0))
    other = write_tiny_checkpoint(tmp_path / "b", TinyOptions(seed=1))
    hf_to_megatron(other, tmp_path / "b_megatron", tp=2, pp=2, progress=False)  # meant for another layout
    cfg = _tiny_run_config(tmp_path, hf_model, f"model.megatron_path={tmp_path / 'b_megatron'}")
    try:
        trainer = Trainer.from_config(cfg, engine=RecordingEngine([], [1]))
        assert trainer.groups.device == torch.device("cpu") == trainer.actor.device
        loaded = hf_state_dict_of(trainer.actor.chunks, trainer.groups)
    finally:
        destroy_parallel()
    expected = load_file(str(other / "model.safetensors"))
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not torch.equal(loaded["lm_head.weight"], load_file(str(hf_model / "model.safetensors"))["lm_head.weight"])


def test_a_megatron_checkpoint_of_another_shape_is_named(tmp_path):
    from megatron_vgpo.checkpoint.convert import hf_to_megatron
    from megatron_vgpo.distributed import destroy_parallel
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, write_tiny_checkpoint
    from megatron_vgpo.trainer import Trainer
    from tests.training.test_colocation import RecordingEngine

    hf_model = write_tiny_checkpoint(tmp_path / "a", TinyOptions(seed=0))
    wider = write_tiny_checkpoint(tmp_path / "w", TinyOptions(seed=0, overrides={"text_config.intermediate_size": 96}))
    hf_to_megatron(wider, tmp_path / "w_megatron", progress=False)
    cfg = _tiny_run_config(tmp_path, hf_model, f"model.megatron_path={tmp_path / 'w_megatron'}")
    try:
        with pytest.raises(ValueError, match=r"w_megatron: cannot load this Megatron checkpoint"):
            Trainer.from_config(cfg, engine=RecordingEngine([], [1]))
    finally:
        destroy_parallel()
