"""``distributed/layout.py``: the layers of each pipeline stage under Megatron's uneven first / last
stages, against Megatron-Core's own ``get_num_layers_to_build`` / ``get_transformer_layer_offset``,
and the errors that name the config fields."""

from __future__ import annotations

import pytest
import torch

from megatron_vgpo.config.schema import ParallelConfig
from megatron_vgpo.distributed.layout import ParallelLayout, PipelineSplit, parallel_layout


def megatron_layers(num_layers: int, pp: int, vpp, first, last):
    """Global layer indices per stage as Megatron builds them, or None when it refuses the split
    (or builds overlapping stages: it does not check that the set counts leave >= 0 layers)."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    try:
        cfg = TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=2,
                                pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
                                num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last,
                                pipeline_dtype=torch.float32)
        stages = []
        for p in range(pp):
            layers = []
            for v in range(vpp) if vpp else [None]:
                offset = get_transformer_layer_offset(cfg, v, p)
                layers.extend(range(offset, offset + get_num_layers_to_build(cfg, v, p)))
            stages.append(tuple(layers))
    except (ValueError, AssertionError, ZeroDivisionError):
        return None
    return tuple(stages) if sorted(sum(stages, ())) == list(range(num_layers)) else None


@pytest.mark.parametrize("num_layers,pp,vpp", [(4, 2, None), (6, 3, None), (12, 4, None), (8, 2, 2),
                                               (12, 3, 2), (12, 4, 3)])
def test_layers_per_stage_are_megatrons(num_layers, pp, vpp):
    accepted = 0
    for first in (None, *range(1, num_layers + 1)):
        for last in (None, *range(1, num_layers + 1)):
            expected = megatron_layers(num_layers, pp, vpp, first, last)
            split = PipelineSplit(first, last)
            if expected is None:
                with pytest.raises(ValueError, match=r"parallel\.|text_config"):
                    split.layer_indices(num_layers, pp, vpp)
                continue
            accepted += 1
            assert split.layer_indices(num_layers, pp, vpp) == expected, (first, last)
            assert split.stage_layers(num_layers, pp, vpp) == tuple(map(len, expected))
    assert accepted > 1


def test_split_counts_and_named_errors():
    assert PipelineSplit().stage_layers(64, 2) == (32, 32)
    assert PipelineSplit(first=20).stage_layers(64, 2) == (20, 44)
    assert PipelineSplit(first=6, last=24).stage_layers(80, 4) == (6, 25, 25, 24)
    assert PipelineSplit(last=23).stage_layers(80, 4) == (19, 19, 19, 23)
    assert PipelineSplit(first=8).layer_indices(16, 2, 2) == (tuple(range(4)) + tuple(range(8, 12)),
                                                             tuple(range(4, 8)) + tuple(range(12, 16)))
    assert PipelineSplit(first=3).megatron_fields() == {"num_layers_in_first_pipeline_stage": 3}
    assert PipelineSplit().megatron_fields() == {}
    cases = [
        (PipelineSplit(), (66, 4, None), r"num_hidden_layers=66 is not divisible by .* = 4"),
        (PipelineSplit(first=7), (80, 4, None), r"leave 73 layers, not divisible by the 3 other pipeline stage"),
        (PipelineSplit(first=2), (4, 1, None), r"need parallel\.pipeline_model_parallel_size >= 2"),
        (PipelineSplit(first=0), (4, 2, None), r"parallel\.first_stage_layers=0 is invalid"),
        (PipelineSplit(first=3), (8, 2, 2), r"first_stage_layers=3 is not divisible by .*virtual"),
        (PipelineSplit(first=2, last=2), (4, 2, 2), r"Megatron needs a stage between them"),
        (PipelineSplit(first=3, last=2), (4, 3, None), r"leave -1 of .* layers for the 1 other"),
        (PipelineSplit(first="auto"), (4, 2, None), r"'auto' must be resolved"),
    ]
    for split, args, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            split.stage_layers(*args)
    with pytest.raises(ValueError, match="resolved"):
        PipelineSplit(last="auto").megatron_fields()


def test_layout_from_the_config_and_its_description():
    layout = parallel_layout(ParallelConfig(tensor_model_parallel_size=8, pipeline_model_parallel_size=2,
                                            first_stage_layers=20), 32)
    assert layout.split == PipelineSplit(20, None) and layout.stage_layers(64) == (20, 44)
    assert layout.describe() == "world size 32 = TP 8 x PP 2 x DP 2"
    assert layout.describe(64) == "world size 32 = TP 8 x PP 2 x DP 2; decoder layers per stage 20 + 44"
    even = ParallelLayout(8, 2, 2, 2)
    assert even.describe(64) == "world size 8 = TP 2 x PP 2 x DP 2; decoder layers per stage 32 + 32 (even)"
    assert ParallelLayout(8, 8, 1, 1).describe(64) == "world size 8 = TP 8 x PP 1 x DP 1"
    auto = parallel_layout(ParallelConfig(pipeline_model_parallel_size=2, first_stage_layers="auto"), 2)
    assert auto.describe(64) == "world size 2 = TP 1 x PP 2 x DP 1"  # not resolved yet: no counts to show


@pytest.mark.parametrize("overrides,pattern", [
    (["parallel.pipeline_model_parallel_size=2", "parallel.first_stage_layers=0"],
     r"parallel\.first_stage_layers=0 is invalid: must be >= 1, 'auto' or null"),
    (["parallel.last_stage_layers=3"],
     r"parallel\.last_stage_layers=3 needs parallel\.pipeline_model_parallel_size >= 2"),
    (["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2",
      "parallel.first_stage_layers=3"],
     r"first_stage_layers=3 is not divisible by .*virtual_pipeline_model_parallel_size=2"),
    (["parallel.first_stage_layers=most"], r"parallel\.first_stage_layers: invalid value 'most'"),
])
def test_config_rules_name_the_fields(overrides, pattern):
    from megatron_vgpo.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_config_split_against_the_model():
    from pathlib import Path

    from megatron_vgpo.config import ConfigError, load_config, validate

    path = str(Path(__file__).resolve().parents[2] / "examples" / "configs" / "qwen25vl_32b.yaml")  # 64 layers, PP 2
    assert validate(load_config(path, ["parallel.first_stage_layers=auto"]), 32).split == PipelineSplit("auto")
    with pytest.raises(ConfigError, match=r"first_stage_layers=64 .* leave 0 of text_config\.num_hidden_layers=64"):
        validate(load_config(path, ["parallel.first_stage_layers=64"]), 32)
    assert load_config(None, ["parallel.first_stage_layers=auto"]).parallel.first_stage_layers == "auto"  # PP 1: even
