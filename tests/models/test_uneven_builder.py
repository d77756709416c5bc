"""The builder and ``transformer_config`` under an uneven pipeline split (``PipelineSplit``), in a world
of one: Megatron's fields are set, and a split that cannot be built is refused with the config fields
named. (The multi-rank facts, HF parity and checkpoints under 1 + 3 / 3 + 1, are
``tests/distributed/test_uneven_stages.py``.)"""

from __future__ import annotations

import dataclasses

import pytest

from megatron_vgpo.config.schema import ModelConfig
from megatron_vgpo.distributed.layout import PipelineSplit
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
from megatron_vgpo.models.qwen2_5_vl.config import arch_from_hf, transformer_config
from tests.conftest import tiny_hf_config

F32 = ModelConfig(params_dtype="float32", attention_backend="local")


def test_transformer_config_carries_the_split(world_of_one):
    hf_config = tiny_hf_config()
    arch = arch_from_hf(hf_config)
    pp2 = dataclasses.replace(world_of_one, pp_size=2)
    config = transformer_config(hf_config, arch, pp2, split=PipelineSplit(first=1))
    assert (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage) == (1, None)
    config = transformer_config(hf_config, arch, pp2, split=PipelineSplit(last=1))
    assert (config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage) == (None, 1)
    even = transformer_config(hf_config, arch, pp2)
    assert (even.num_layers_in_first_pipeline_stage, even.num_layers_in_last_pipeline_stage) == (None, None)


def test_a_split_that_cannot_be_built_is_named(world_of_one):
    hf_config = tiny_hf_config()  # 4 decoder layers
    with pytest.raises(ValueError, match=r"need parallel\.pipeline_model_parallel_size >= 2 \(got 1\)"):
        build_policy(hf_config, F32, world_of_one, PipelineSplit(first=1))
    with pytest.raises(ValueError, match=r"'auto' must be resolved by the FLOP model"):
        build_policy(hf_config, F32, world_of_one, PipelineSplit(first="auto"))
    with pytest.raises(ValueError, match=r"num_hidden_layers=4 is not divisible by .* = 3"):
        build_policy(hf_config, F32, dataclasses.replace(world_of_one, pp_size=3))
    pp3 = dataclasses.replace(world_of_one, pp_size=3)
    with pytest.raises(ValueError, match=r"leave 1 layers, not divisible by the 2 other"):
        build_policy(hf_config, F32, pp3, PipelineSplit(first=3))
