"""``--model``: an HF directory as is; a Megatron checkpoint (hf_to_megatron output, a training step
directory or its save_dir) exported once to OUTPUT/hf_model with the same weights."""

from __future__ import annotations

import shutil

import pytest
import torch

from megatron_vgpo.evaluation import EvalError
from megatron_vgpo.evaluation.model import EXPORT_DIR, resolve_model


def test_hf_directory_is_used_as_is(tiny_model, tmp_path):
    assert resolve_model(tiny_model, tmp_path / "out") == tiny_model
    assert not (tmp_path / "out").exists()


def test_neither_hf_nor_megatron(tmp_path):
    with pytest.raises(EvalError, match="neither a Hugging Face checkpoint"):
        resolve_model(tmp_path, tmp_path / "out")


@pytest.mark.slow
def test_megatron_checkpoint_is_exported_once(tiny_model, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from megatron_vgpo.checkpoint.convert import hf_to_megatron

    step = hf_to_megatron(tiny_model, tmp_path / "ckpt" / "step_00000010", progress=False)
    (tmp_path / "ckpt" / "latest").write_text("step_00000010\n")  # a training save_dir
    out = tmp_path / "out"
    exported = resolve_model(tmp_path / "ckpt", out)
    assert exported == out / EXPORT_DIR and (exported / "config.json").is_file()
    before, after = load_file(tiny_model / "model.safetensors"), {}
    for f in exported.glob("*.safetensors"):
        after.update(load_file(f))
    assert sorted(before) == sorted(after) and all(torch.equal(before[k], after[k]) for k in before)

    # A resumed run reuses the export (the record in hf_model/source.json names the same checkpoint).
    import megatron_vgpo.checkpoint.convert as convert

    monkeypatch.setattr(convert, "megatron_to_hf", lambda *a, **k: pytest.fail("exported again"))
    assert resolve_model(step, out) == exported
    monkeypatch.undo()
    # Without hf_config/ inside the checkpoint, --hf-config gives the config and tokenizer.
    shutil.rmtree(step / "hf_config")
    with pytest.raises(EvalError, match="give --hf-config DIR"):
        resolve_model(step, tmp_path / "out2")
    assert (resolve_model(step, tmp_path / "out2", hf_config=str(tiny_model)) / "config.json").is_file()


def test_prompt_length_fits_the_context(tiny_model):
    from megatron_vgpo.evaluation import EvalConfig
    from megatron_vgpo.evaluation.model import context_length
    from megatron_vgpo.evaluation.runner import fit_context

    assert context_length(tiny_model) == 4096  # the tiny model's text_config.max_position_embeddings
    cfg = EvalConfig(model=str(tiny_model))
    assert fit_context(cfg, 4096).max_prompt_length == 4096 - 2048  # the default 8192 would not fit
    assert fit_context(cfg, 128000) is cfg and fit_context(cfg, None) is cfg
    with pytest.raises(EvalError, match="--max-new-tokens 2048 does not fit the model's context of 2000"):
        fit_context(cfg, 2000)
