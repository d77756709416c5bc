"""Weight-sync transports (``rollout/transport.py``): TP shards written in place into the full tensors'
layout equal ``name_mapping.unshard`` bit for bit, and a TP2 x PP2 stream through both transports
under torchrun (4 ranks, gloo, one host; ``transport_worker.py``): exact, and with shared memory read
in place, each bucket's tensors intact after the next bucket was exchanged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm
from megatron_vgpo.models.qwen2_5_vl.config import arch_from_hf
from megatron_vgpo.models.qwen2_5_vl.loading import iter_safetensors
from megatron_vgpo.rollout.transport import SharedMemoryTransport, _writers
from megatron_vgpo.utils.deps import has
from tests.conftest import run_torchrun

WORKER = Path(__file__).with_name("transport_worker.py")


def test_shards_written_in_place_equal_unshard(tiny_vl_dir):
    """Every partitioned parameter of the tiny model, TP2: the shards (cut by ``shard``) written at
    their place rebuild the original exactly, as ``unshard`` does, for dim 0, dim 1 and stride 2."""
    arch = arch_from_hf(AutoConfig.from_pretrained(tiny_vl_dir), tp_size=2)
    kinds = set()
    for name, original in nm.hf_to_megatron(iter_safetensors(tiny_vl_dir), arch):
        dim, stride = nm.tp_partition(name)
        if dim is None:
            continue
        kinds.add((dim, stride))
        shards = [nm.shard(name, original, r, 2) for r in range(2)]
        full = torch.full_like(original, float("nan"))
        for r, shard in enumerate(shards):
            nm.write_shard(name, full, shard, r, 2)
        assert torch.equal(full, nm.unshard(name, shards)), name
        assert torch.equal(full, original), name
    assert kinds == {(0, 1), (1, 1), (0, 2)}


def test_segments_and_writers():
    """Buckets alternate between two segments (a bucket moving nothing is not exchanged), each as large
    as its largest bucket; the TP ranks of a stage share the replicated parameters' bytes."""
    assert SharedMemoryTransport.segment_bytes([10, 0, 30, 20, 5]) == (20, 30)
    assert SharedMemoryTransport.segment_bytes([0, 7]) == (7, 0)

    class E:
        def __init__(self, name, numel, rows=1):
            self.name, self.numel, self.rows, self.dtype = name, numel, rows, torch.float32

    writers = _writers([E("a", 10), E("p", 100, rows=2), E("b", 6), E("c", 5), E("d", 1)], tp_size=2)
    assert writers == {"a": 0, "b": 1, "c": 1, "d": 0}


def assert_streams_correct(got: dict, rank: int) -> None:
    """One rank's ``transport_worker.check_stream`` results, shared memory then collectives."""
    shm, collective = got["stream"], got["stream_collective"]
    assert shm["transport"] == "SharedMemoryTransport"  # one host, gloo
    assert collective["transport"] == "CollectiveTransport"
    for stream in (shm, collective):
        assert stream["exact"], f"rank {rank} {stream['transport']}: tensors differ from the checkpoint"
        assert stream["opens"] == 1 and stream["released"]
        assert not stream["held_tensor_overwritten"]
        assert stream["max_buffer_bytes"] <= max(got["bucket_bytes"], stream["largest_module_bytes"])
    # Read in place, and valid until two more buckets have been exchanged (the transport's contract).
    assert shm["in_place"] > 0 and shm["exchanges"] > 2
    assert not shm["previous_bucket_overwritten"], f"rank {rank}: bucket k changed when bucket k+1 arrived"


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.skipif(has("vllm"), reason="with vLLM, the shared TP2 x PP2 launch (conftest.tp2_pp2_results, "
                    "mode sync) runs these same checks (check_stream on both transports, assert_streams_correct) "
                    "before its engines")
def test_tp2_pp2_stream_through_both_transports(tiny_vl_dir, tmp_path):
    run_torchrun(WORKER, 4, tiny_vl_dir, tmp_path, timeout=600)
    for rank in range(4):
        assert_streams_correct(json.loads((tmp_path / f"rank{rank}.json").read_text()), rank)
