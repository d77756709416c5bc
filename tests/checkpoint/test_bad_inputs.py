"""Inputs the converters must refuse with an error naming the culprit, and outputs that must never
look complete when a conversion did not finish."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from checkpoint_conversion import hf_to_megatron as hf_to_megatron_cli
from checkpoint_conversion import megatron_to_hf as megatron_to_hf_cli
from megatron_vgpo.checkpoint import convert
from megatron_vgpo.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_vgpo.checkpoint.hf_io import HFCheckpoint
from megatron_vgpo.checkpoint.model_io import load_model_checkpoint


@pytest.fixture(scope="module")
def converted(tiny_hf_dirs, tmp_path_factory):
    """``{"untied": dir, "tied": dir}``: the tiny checkpoints converted to Megatron."""
    root = tmp_path_factory.mktemp("converted")
    return {kind: hf_to_megatron(src, root / kind, progress=False) for kind, src in tiny_hf_dirs.items()}


def copy_with_config(src, dst, **text_changes):
    """A copy of HF dir ``src`` whose config.json has other text_config values."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["text_config"].update(text_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def rewrite_weights(src, dst, drop=(), add=None):
    """A copy of HF dir ``src`` with some tensors dropped or added."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    ckpt = HFCheckpoint(src)
    tensors = {n: ckpt.read(n) for n in ckpt.info if n not in drop}
    save_file({**tensors, **(add or {})}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_hf_checkpoint_of_another_config_names_the_tensor_and_both_shapes(tiny_hf_dirs, tmp_path):
    other = copy_with_config(tiny_hf_dirs["untied"], tmp_path / "other", intermediate_size=384)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \(\d+, \d+\) .*"
                                         r"expects \(\d+, \d+\)"):
        hf_to_megatron(other, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_megatron_checkpoint_of_another_config_names_the_tensor_and_both_shapes(tiny_hf_dirs, converted, tmp_path):
    other = copy_with_config(tiny_hf_dirs["untied"], tmp_path / "other", intermediate_size=384)
    with pytest.raises(ValueError, match=r"'language_model\.decoder\.layers\.mlp\.linear_fc\d\.weight' has shape "
                                         r"\(4, \d+, \d+\) .* expects \(4, \d+, \d+\)"):
        megatron_to_hf(converted["untied"], tmp_path / "out", hf_config_dir=other, progress=False)


def test_missing_hf_tensor_is_named(tiny_hf_dirs, tmp_path):
    dropped = "model.layers.2.self_attn.k_proj.bias"
    broken = rewrite_weights(tiny_hf_dirs["untied"], tmp_path / "broken", drop=(dropped,))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.2\.self_attn\.k_proj\.bias'"):
        hf_to_megatron(broken, tmp_path / "out", progress=False)


def test_unexpected_hf_tensor_is_named(tiny_hf_dirs, tmp_path):
    broken = rewrite_weights(tiny_hf_dirs["untied"], tmp_path / "broken", add={"model.layers.9.extra": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.9\.extra'"):
        hf_to_megatron(broken, tmp_path / "out", progress=False)


def test_missing_megatron_tensor_is_named(tiny_hf_dirs, converted, tmp_path):
    # a tied checkpoint read with an untied config: no output layer
    with pytest.raises(ValueError, match=r"missing tensor 'language_model\.output_layer\.weight'"):
        megatron_to_hf(converted["tied"], tmp_path / "out", hf_config_dir=tiny_hf_dirs["untied"], progress=False)


def test_unexpected_megatron_tensor_is_named(tiny_hf_dirs, converted, tmp_path):
    with pytest.raises(ValueError, match=r"unexpected tensor 'language_model\.output_layer\.weight'"):
        megatron_to_hf(converted["untied"], tmp_path / "out", hf_config_dir=tiny_hf_dirs["tied"], progress=False)


@pytest.mark.parametrize("tp, pp, field", [(3, 1, "text_config.num_attention_heads"),
                                           (4, 1, "text_config.num_key_value_heads"),
                                           (1, 3, "text_config.num_hidden_layers")])
def test_layout_that_does_not_fit_names_the_field(tiny_hf_dirs, tmp_path, capsys, tp, pp, field):
    args = ["--hf-dir", str(tiny_hf_dirs["untied"]), "--output", str(tmp_path / "out"), "--tp", str(tp),
            "--pp", str(pp), "--no-progress"]
    assert hf_to_megatron_cli.main(args) == 2
    assert field in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_non_empty_output_is_refused_unless_force(tiny_hf_dirs, converted, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    args = ["--megatron-dir", str(converted["untied"]), "--output", str(out), "--no-progress"]
    assert megatron_to_hf_cli.main(args) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert megatron_to_hf_cli.main(args + ["--force", "--max-shard-size", "200KB"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").exists()


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_after(monkeypatch, owner, attr: str, calls: int) -> None:
    original = getattr(owner, attr)
    count = [0]

    def wrapped(*args, **kwargs):
        count[0] += 1
        if count[0] > calls:
            raise Interrupt()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapped)


def test_interrupted_hf_to_megatron_leaves_no_output(tiny_hf_dirs, tmp_path, monkeypatch):
    from torch.distributed.checkpoint import CheckpointException

    interrupt_after(monkeypatch, HFCheckpoint, "read", 20)
    with pytest.raises(CheckpointException, match="Interrupt"):  # DCP wraps what its writer raises
        hf_to_megatron(tiny_hf_dirs["untied"], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_megatron_to_hf_leaves_no_output(converted, tmp_path, monkeypatch):
    from megatron_vgpo.checkpoint.dist_io import DistCheckpointReader

    interrupt_after(monkeypatch, DistCheckpointReader, "read", 20)
    with pytest.raises(Interrupt):
        megatron_to_hf(converted["untied"], tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_without_metadata_json_is_refused(converted, tmp_path, monkeypatch):
    """What a killed conversion leaves behind (``metadata.json`` is written last) never loads."""
    partial = tmp_path / "partial"
    shutil.copytree(converted["untied"], partial)
    (partial / "metadata.json").unlink()
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        megatron_to_hf(partial, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        load_model_checkpoint([], partial)


def test_metadata_json_is_the_last_file_written(tiny_hf_dirs, tmp_path, monkeypatch):
    written = []
    original = convert.finalize_megatron_dir

    def spy(out_dir):
        written.append(sorted(p.name for p in out_dir.iterdir()))
        original(out_dir)

    monkeypatch.setattr(convert, "finalize_megatron_dir", spy)
    out = hf_to_megatron(tiny_hf_dirs["untied"], tmp_path / "out", progress=False)
    assert "metadata.json" not in written[0] and ".metadata" in written[0]
    assert (out / "metadata.json").exists()


def test_output_that_is_the_input_is_refused(tiny_hf_dirs, tmp_path):
    copy = shutil.copytree(tiny_hf_dirs["untied"], tmp_path / "hf")
    with pytest.raises(ValueError, match="is the input"):
        hf_to_megatron(copy, copy, force=True, progress=False)
    assert (copy / "config.json").exists()


_SLOW_CLI = """
import runpy, sys, time
from megatron_vgpo.checkpoint.hf_io import HFCheckpoint
read = HFCheckpoint.read
HFCheckpoint.read = lambda self, name: (time.sleep(0.05), read(self, name))[1]  # slow enough to be killed
sys.argv = ["hf_to_megatron.py"] + sys.argv[1:]
runpy.run_path("checkpoint_conversion/hf_to_megatron.py", run_name="__main__")
"""


def test_sigterm_during_conversion_leaves_no_output(tiny_hf_dirs, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, "--hf-dir", str(tiny_hf_dirs["untied"]),
                             "--output", str(out), "--no-progress"], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not any(tmp_path.glob("out.tmp-*/*.distcp")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is not None or time.time() >= deadline:
        proc.kill()
        pytest.fail(f"the conversion was not caught in the middle: {proc.communicate()[1].decode()[-2000:]}")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0  # 143, or 1 when DCP wrapped the exit into its own exception
    assert list(tmp_path.iterdir()) == []
