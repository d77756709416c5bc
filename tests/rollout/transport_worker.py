"""torchrun worker of ``test_transport.py``: the Megatron -> HF stream of a TP2 x PP2 model through both
transports, 4 ranks, gloo, one host.

    torchrun --nproc-per-node 4 transport_worker.py MODEL_DIR OUT_DIR

``check_stream`` (also run by ``weight_sync_worker.py`` before its vLLM engines) consumes the stream
as vLLM's loader may, holding what it got, and records on every rank: exactness against the
checkpoint, one transport allocation per sync released at the end, the held tensor never overwritten
by the next bucket, and, for the shared-memory transport, that tensors are read in place and stay
intact until two more buckets have been exchanged. Every rank writes ``OUT_DIR/rank{r}.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoConfig

from megatron_vgpo.config.schema import ModelConfig, ParallelConfig
from megatron_vgpo.distributed import destroy_parallel, init_parallel
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights
from megatron_vgpo.rollout.transport import CollectiveTransport, SharedMemoryTransport
from megatron_vgpo.rollout.weight_sync import WeightResharder

BUCKET_BYTES = 96 << 10


class _Recorder:
    """Wraps a transport: counts its allocations, groups the streamed tensors by the exchange they
    arrived after, and checks after each exchange that the tensors of the previous one are intact
    (the shared-memory contract: valid until two more buckets have been exchanged)."""

    def __init__(self, transport, ref: dict[str, torch.Tensor]):
        self.transport, self.ref, self.opens, self.exchanged = transport, ref, [], [[]]
        self.previous_bucket_overwritten, self.in_place = False, 0  # in_place: views of shared memory
        self.real_open, self.real_exchange = transport.open, transport.exchange
        transport.open, transport.exchange = self.open, self.exchange

    def open(self, bucket_bytes: list[int]) -> None:
        self.opens.append(max(bucket_bytes))
        self.real_open(bucket_bytes)

    def exchange(self, *args):
        full = self.real_exchange(*args)
        if isinstance(self.transport, SharedMemoryTransport):
            self.previous_bucket_overwritten |= not all(torch.equal(t, self.ref[n]) for n, t in self.exchanged[-1])
        self.exchanged.append([])
        return full

    def received(self, name: str, tensor: torch.Tensor) -> None:
        self.exchanged[-1].append((name, tensor))
        if isinstance(self.transport, SharedMemoryTransport):  # both segments share one storage
            segments = self.transport.segments[0].untyped_storage()
            self.in_place += tensor.untyped_storage().data_ptr() == segments.data_ptr()

    def detach(self) -> None:
        del self.transport.open, self.transport.exchange


def check_stream(sync: WeightResharder, model_dir: str) -> dict:
    """Exactness against the checkpoint; one transport allocation per sync, within the bucket limit and
    released at the end; a consumer that holds only its current tensor (as vLLM's loader does) never
    sees it overwritten by the next bucket; and with shared memory, the tensors are views of the
    segments that survive the next exchange."""
    from safetensors.torch import load_file

    from megatron_vgpo.models.qwen2_5_vl.name_mapping import canonical_hf_name

    ref = {canonical_hf_name(k): v for k, v in load_file(Path(model_dir) / "model.safetensors").items()}
    stats = {"held_tensor_overwritten": False, "transport": type(sync.transport).__name__}
    recorder = _Recorder(sync.transport, ref)
    got, held = {}, None
    for name, tensor in sync.hf_weights():
        if held is not None and not torch.equal(held[1], ref[held[0]]):
            stats["held_tensor_overwritten"] = True
        got[name], held = tensor.clone(), (name, tensor)
        recorder.received(name, tensor)
    stats.update(opens=len(recorder.opens), max_buffer_bytes=max(recorder.opens), released=not sync.transport.is_open,
                 previous_bucket_overwritten=recorder.previous_bucket_overwritten, in_place=recorder.in_place,
                 exchanges=len(recorder.exchanged) - 1)
    recorder.detach()
    stats["exact"] = got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    stats["largest_module_bytes"] = max(sum(e.numel * e.dtype.itemsize for e in b.entries if e.module == m)
                                        for b in sync.buckets for m in {e.module for e in b.entries})
    stats["num_buckets"] = len(sync.buckets)
    return stats


def tp2_pp2_policy(model_dir: str):
    """This rank's chunks of the checkpoint under TP2 x PP2 (gloo), and the parallel groups."""
    groups = init_parallel(ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                                          backend="gloo"))
    chunks = build_policy(AutoConfig.from_pretrained(model_dir),
                          ModelConfig(params_dtype="float32", attention_backend="local"), groups)
    load_hf_weights(chunks, model_dir)
    return chunks, groups


def main(model_dir: str, out_dir: str) -> None:
    chunks, groups = tp2_pp2_policy(model_dir)
    results = {"bucket_bytes": BUCKET_BYTES}
    results["stream"] = check_stream(WeightResharder(chunks, groups, bucket_bytes=BUCKET_BYTES), model_dir)
    collective = WeightResharder(chunks, groups, bucket_bytes=BUCKET_BYTES)
    collective.transport = CollectiveTransport(groups, torch.device("cpu"))
    results["stream_collective"] = check_stream(collective, model_dir)
    (Path(out_dir) / f"rank{dist.get_rank()}.json").write_text(json.dumps(results))
    destroy_parallel()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
