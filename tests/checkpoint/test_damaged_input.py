"""``megatron_to_hf`` refuses a damaged checkpoint with an error naming the file (issue 17): a
training checkpoint against the manifest in its ``complete.json``, a converted one (no manifest)
against its ``metadata.json`` and ``.metadata``'s storage records."""

from __future__ import annotations

import shutil

import pytest

from checkpoint_conversion import megatron_to_hf as megatron_to_hf_cli
from megatron_vgpo.checkpoint.convert import hf_to_megatron, megatron_to_hf
from megatron_vgpo.config.schema import CheckpointConfig
from megatron_vgpo.training.checkpointing import CheckpointManager


@pytest.fixture(scope="module")
def converted(tiny_hf_dirs, tmp_path_factory):
    return hf_to_megatron(tiny_hf_dirs["untied"], tmp_path_factory.mktemp("converted") / "megatron", progress=False)


def damaged_copy(src, dst, damage):
    shutil.copytree(src, dst)
    damage(dst)
    return dst


def truncate(name_glob: str, size: int = 1000):
    def damage(path):
        with open(sorted(path.glob(name_glob))[0], "r+b") as f:
            f.truncate(size)
    return damage


def overwrite(name: str, data: bytes):
    def damage(path):
        (path / name).write_bytes(data)
    return damage


def delete(name_glob: str):
    def damage(path):
        sorted(path.glob(name_glob))[0].unlink()
    return damage


CONVERTED_DAMAGE = {
    "truncated_shard": (truncate("*.distcp"), r"__0_0\.distcp has 1000 bytes, \.metadata places data up to byte \d+"),
    "missing_shard": (delete("*.distcp"), r"missing __0_0\.distcp \(listed in \.metadata\)"),
    "corrupt_dcp_metadata": (truncate(".metadata", 100), r"\.metadata is corrupt \(\w+"),
    "corrupt_metadata_json": (overwrite("metadata.json", b"{\"sharded_backend\": "), r"metadata\.json is corrupt"),
}


@pytest.mark.parametrize("kind", CONVERTED_DAMAGE)
def test_damaged_converted_checkpoint_is_refused_by_name(converted, tmp_path, kind, capsys):
    damage, reason = CONVERTED_DAMAGE[kind]
    broken = damaged_copy(converted, tmp_path / "broken", damage)
    with pytest.raises(ValueError, match=rf"refusing to convert a damaged checkpoint: .*{reason}"):
        megatron_to_hf(broken, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert megatron_to_hf_cli.main(["--megatron-dir", str(broken), "--output", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron_to_hf: error: refusing to convert a damaged checkpoint") and str(broken) in err


def test_damaged_training_checkpoint_is_refused_by_name(world_of_one, tmp_path, capsys):
    from tests.training.tiny_loop import TinyData, build, train_step

    run, data = build(world_of_one), TinyData()
    train_step(run, data)
    ckpt = CheckpointManager(CheckpointConfig(save_dir=str(tmp_path / "ckpt")), 0, 1)
    path = ckpt.save(1, run.ddp, run.optimizer, run.scheduler.state_dict(), data.state_dict())
    truncate("*.distcp")(path)
    with pytest.raises(ValueError, match=r"step_00000001 is damaged: __0_0\.distcp has 1000 bytes, complete\.json "
                                         r"records \d+ \(cut short\?\)"):
        megatron_to_hf(path, tmp_path / "out", progress=False)
    assert megatron_to_hf_cli.main(["--megatron-dir", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "__0_0.distcp has 1000 bytes" in capsys.readouterr().err
