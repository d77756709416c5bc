"""``init_parallel`` / ``ParallelGroups`` in a world of one, and the layout arithmetic. (The
multi-rank group facts are asserted by ``grad_worker.py`` under TP2 x PP2.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_vgpo.config.schema import ParallelConfig
from megatron_vgpo.distributed import layout_string
from megatron_vgpo.distributed.parallel import resolve_backend


def test_world_of_one(world_of_one):
    g = world_of_one
    assert (g.world_size, g.tp_size, g.pp_size, g.dp_size) == (1, 1, 1, 1)
    assert g.is_first_stage and g.is_last_stage and g.chunk_stages() == (True, True)
    assert g.pp_ranks == (0,) and g.device == torch.device("cpu")
    assert g.describe() == "rank 0/1: tp 0/1 pp 0/1 dp 0/1"


def test_virtual_pipeline_chunk_stages(world_of_one):
    last_rank = dataclasses.replace(world_of_one, pp_size=2, pp_rank=1, vpp_size=2)
    assert [last_rank.chunk_stages(v) for v in (0, 1)] == [(False, False), (False, True)]
    first_rank = dataclasses.replace(last_rank, pp_rank=0)
    assert [first_rank.chunk_stages(v) for v in (0, 1)] == [(True, False), (False, False)]


def test_layout_string_and_backend():
    parallel = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert layout_string(parallel, 8) == "world size 8 = TP 2 x PP 2 x DP 2"
    with pytest.raises(ValueError, match="not divisible"):
        layout_string(parallel, 6)
    if not torch.cuda.is_available():
        assert resolve_backend("auto") == "gloo"
        with pytest.raises(ValueError, match="needs CUDA"):
            resolve_backend("nccl")
