"""HF <-> Megatron conversion on one process: bit-exact round trips, dtypes, files, and that the
checkpoint has exactly the tensors (keys, global shapes, objects) the Megatron model asks for."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from megatron_vgpo.checkpoint.convert import CONVERSION_FILE, HF_CONFIG_DIR, hf_to_megatron, megatron_to_hf
from megatron_vgpo.checkpoint.hf_io import HFCheckpoint


def hf_tensors(path) -> dict[str, torch.Tensor]:
    ckpt = HFCheckpoint(path)
    return {name: ckpt.read(name) for name in ckpt.info}


def assert_bit_exact(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    different = [n for n in a if a[n].dtype != b[n].dtype or not torch.equal(a[n], b[n])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_round_trip_tp2_pp2_is_bit_exact(tiny_hf_dirs, tmp_path, kind):
    src = tiny_hf_dirs[kind]
    meg = hf_to_megatron(src, tmp_path / "megatron", tp=2, pp=2, progress=False)
    back = megatron_to_hf(meg, tmp_path / "hf", max_shard_bytes=300_000, progress=False)
    original = hf_tensors(src)
    assert all(t.dtype == torch.float32 for t in original.values())
    assert_bit_exact(original, hf_tensors(back))
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # really sharded
    record = json.loads((meg / CONVERSION_FILE).read_text())
    assert record["written_for"] == {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2}


def test_round_trip_keeps_processor_files_and_loads_with_from_pretrained(tiny_full_dir, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor

    meg = hf_to_megatron(tiny_full_dir, tmp_path / "megatron", tp=2, pp=2, progress=False)
    assert (meg / HF_CONFIG_DIR / "tokenizer.json").is_file()
    back = megatron_to_hf(meg, tmp_path / "hf", progress=False)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "chat_template.json", "generation_config.json"):
        assert (back / name).read_bytes() == (tiny_full_dir / name).read_bytes(), name
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(back)
    reference = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_full_dir)
    for (name, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    assert load_processor(back).tokenizer("<|image_pad|>")["input_ids"] == [reference.config.image_token_id]


def test_bf16_conversion_both_ways(tiny_hf_dirs, tmp_path):
    src = tiny_hf_dirs["untied"]
    meg = hf_to_megatron(src, tmp_path / "megatron", dtype=torch.bfloat16, progress=False)
    assert json.loads((meg / CONVERSION_FILE).read_text())["dtypes"] == ["bfloat16"]
    back = megatron_to_hf(meg, tmp_path / "hf", progress=False)  # auto: keeps bf16
    expected = {n: t.to(torch.bfloat16) for n, t in hf_tensors(src).items()}
    assert_bit_exact(expected, hf_tensors(back))
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    up = megatron_to_hf(meg, tmp_path / "hf32", dtype=torch.float32, progress=False)
    assert_bit_exact({n: t.float() for n, t in expected.items()}, hf_tensors(up))


def test_safetensors_shards_are_valid_files(tiny_hf_dirs, tmp_path):
    meg = hf_to_megatron(tiny_hf_dirs["tied"], tmp_path / "megatron", progress=False)
    back = megatron_to_hf(meg, tmp_path / "hf", max_shard_bytes=500_000, progress=False)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    total = 0
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(back / file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            for name in f.keys():
                assert index["weight_map"][name] == file
                total += f.get_tensor(name).nbytes
    assert total == index["metadata"]["total_size"]
    assert "lm_head.weight" not in index["weight_map"]  # tied: HF stores the embedding only


@pytest.mark.parametrize("tied", [False, True])
def test_checkpoint_has_exactly_what_the_megatron_model_loads(tiny_hf_dirs, tmp_path, world_of_one, tied):
    """Keys, global shapes and objects of the converted checkpoint = the model's sharded_state_dict()
    (the guard against a megatron-core release changing its checkpoint format)."""
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from transformers import AutoConfig

    from megatron_vgpo.checkpoint.dist_io import DistCheckpointReader
    from megatron_vgpo.config.schema import ModelConfig
    from megatron_vgpo.models.qwen2_5_vl.builder import build_policy

    src = tiny_hf_dirs["tied" if tied else "untied"]
    model_cfg = ModelConfig(params_dtype="float32", attention_backend="local")
    chunks = build_policy(AutoConfig.from_pretrained(src), model_cfg, world_of_one)
    sharded = chunks[0].sharded_state_dict()
    apply_factories(sharded)
    wanted = {v.key: tuple(v.global_shape) for v in nested_values(sharded) if isinstance(v, ShardedTensor)}
    objects = {v.unique_key for v in nested_values(sharded) if isinstance(v, ShardedObject)}
    reader = DistCheckpointReader(hf_to_megatron(src, tmp_path / "megatron", progress=False))
    assert {k: reader.shape(k) for k in reader.tensors} == wanted
    assert set(reader.objects) == objects
