"""The chunk-by-chunk distributed-checkpoint writer and reader, on synthetic tensors."""

from __future__ import annotations

import weakref

import torch

from megatron_vgpo.checkpoint.dist_io import (Chunk, DistCheckpointReader, GlobalTensor, finalize_megatron_dir,
                                              layer_chunks, whole_chunk, write_tensors)


def test_no_chunk_outlives_its_write_and_any_box_reads_back(tmp_path):
    """Memory stays at one chunk: when chunk n is computed, chunks 0..n-1 are already freed, even
    across many keys (torch's stock writer keeps the last chunk of every key)."""
    full = {f"t{i}": torch.randn(3, 4, 5) for i in range(6)}
    specs = [GlobalTensor(k, (3, 4, 5), torch.float32, layer_chunks(3, (4, 5))) for k in list(full)[:3]]
    specs += [GlobalTensor(k, (3, 4, 5), torch.float32, whole_chunk((3, 4, 5))) for k in list(full)[3:]]
    produced: list[weakref.ref] = []

    def chunk_fn(spec: GlobalTensor, chunk: Chunk) -> torch.Tensor:
        alive = sum(ref() is not None for ref in produced)
        assert alive == 0, f"{alive} earlier chunks still referenced while computing {spec.key} {chunk}"
        box = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
        array = full[spec.key][box].numpy().copy()
        produced.append(weakref.ref(array))  # alive as long as any tensor shares its memory
        return torch.from_numpy(array)

    write_tensors(tmp_path, specs, chunk_fn, {"obj/shard_0_1": [None]})
    finalize_megatron_dir(tmp_path)
    assert len(produced) == 3 * 3 + 3
    reader = DistCheckpointReader(tmp_path)
    assert reader.objects == ["obj/shard_0_1"] and all(reader.is_fully_covered(k) for k in full)
    assert torch.equal(reader.read("t0", Chunk((1, 0, 0), (1, 4, 5)))[0], full["t0"][1])
    assert torch.equal(reader.read("t1", Chunk((0, 2, 1), (3, 2, 3))), full["t1"][:, 2:, 1:4])  # across chunks
    assert torch.equal(reader.read("t5", Chunk((0, 0, 0), (3, 4, 5))), full["t5"])
