"""Read and write Megatron-Core distributed checkpoints (``torch_dist`` format) one chunk at a time.

A Megatron-Core ``torch_dist`` checkpoint directory is a PyTorch Distributed Checkpoint (DCP) plus two
Megatron files:

- ``*.distcp`` + ``.metadata``: DCP's format. Each GLOBAL tensor (e.g.
  ``language_model.decoder.layers.self_attention.linear_qkv.weight`` of shape ``[L, 3d', d]``, the
  layers stacked on a leading axis) is stored as chunks with offsets; ``.metadata`` lists every
  tensor's global shape, dtype and chunks, and where each chunk's bytes lie.
- ``common.pt`` (the non-sharded state, ``{}`` for a model) and ``metadata.json`` (the backend name and
  version, which ``dist_checkpointing.load`` reads first; written LAST so that a directory without it
  is visibly incomplete).

Why this works for layout-free conversion: the global tensors do not depend on TP/PP (TP shards are
slices of them, PP stages own slices of the layer axis; ``dist_checkpointing.load`` reads any
overlap of any chunk), so a converter may store each global tensor, or each of its layers, as ONE
chunk, and the TP/PP layout only matters when a model loads it. The writer below drives DCP's own
``save`` with lazy tensors (``_LazyGlobalTensor``, DCP's "checkpointable" protocol that Megatron
itself uses): DCP asks for one chunk at a time and writes it before asking for the next, so peak
memory is one chunk whatever the model size, and the files and ``.metadata`` are exactly what DCP
writes (``_OneAtATimeWriter`` only changes how long chunks stay referenced), readable by any
torch/Megatron version that reads DCP. Reading is symmetric: DCP ``load`` into a one-chunk target
(``_ChunkTarget``), which also assembles chunks saved by a TP/PP training run.

This module knows nothing about Qwen2.5-VL: ``megatron_vgpo.checkpoint.qwen2_5_vl`` says which
global tensors exist and how to compute each chunk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem as _dcp_fs
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType
from torch.futures import Future

MEGATRON_BACKEND = ("torch_dist", 1)  # what metadata.json announces: sharded backend and version


@dataclass(frozen=True)
class Chunk:
    """A box of a global tensor: ``offsets`` and ``sizes`` per dimension."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass
class GlobalTensor:
    """One tensor of a distributed checkpoint and the chunks it is stored as."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: list[Chunk] = field(default_factory=list)


ChunkFn = Callable[[GlobalTensor, Chunk], torch.Tensor]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def layer_chunks(num_layers: int, layer_shape: tuple[int, ...]) -> list[Chunk]:
    """One chunk per layer of a ``[num_layers, *layer_shape]`` stacked tensor."""
    zeros = (0,) * len(layer_shape)
    return [Chunk((i, *zeros), (1, *layer_shape)) for i in range(num_layers)]


def whole_chunk(shape: tuple[int, ...]) -> list[Chunk]:
    return [Chunk((0,) * len(shape), tuple(shape))]


# ---- writing --------------------------------------------------------------------------------------

class _LazyGlobalTensor(torch.Tensor):
    """A global tensor whose chunks are computed only when DCP writes them.

    Implements DCP's checkpointable protocol (``__create_write_items__``, ``__create_chunk_list__``,
    ``__get_tensor_shard__``); it holds no data and supports no tensor operations.
    """

    @staticmethod
    def __new__(cls, spec: GlobalTensor, chunk_fn: ChunkFn):
        return torch.Tensor._make_wrapper_subclass(cls, spec.shape, dtype=spec.dtype, device="cpu")

    def __init__(self, spec: GlobalTensor, chunk_fn: ChunkFn):
        self._spec, self._chunk_fn = spec, chunk_fn

    def __create_write_items__(self, fqn: str, obj: Any) -> list[WriteItem]:
        props = TensorProperties(dtype=self._spec.dtype)
        return [
            WriteItem(index=MetadataIndex(fqn, torch.Size(c.offsets), i), type=WriteItemType.SHARD,
                      tensor_data=TensorWriteData(chunk=_storage_chunk(c), properties=props,
                                                  size=torch.Size(self._spec.shape)))
            for i, c in enumerate(self._spec.chunks)
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [_storage_chunk(c) for c in self._spec.chunks]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        chunk = next(c for c in self._spec.chunks if c.offsets == tuple(index.offset))
        data = self._chunk_fn(self._spec, chunk)
        if tuple(data.shape) != chunk.sizes or data.dtype != self._spec.dtype:
            raise RuntimeError(f"chunk {chunk} of '{self._spec.key}' came out as {tuple(data.shape)} "
                               f"{data.dtype}, expected {chunk.sizes} {self._spec.dtype}")
        return data.contiguous()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{cls.__name__} only describes chunks for DCP; {func} is not supported")


def _storage_chunk(c: Chunk) -> ChunkStorageMetadata:
    return ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes))


class _OneAtATimeWriter(dcp.FileSystemWriter):
    """DCP's file writer, writing the items of the plan one by one and keeping none of them.

    Why not the stock ``write_data``: torch 2.13's keeps a reference to the last written chunk of
    EVERY key (it collects them for its safetensors output format, even when writing torch_save),
    so memory would grow with the number of keys (hundreds of vision-tower tensors, the embeddings)
    instead of staying at one chunk. The file format is untouched: same ``_write_item`` per item,
    same ``.metadata`` (written by the inherited ``finish``). Relies on ``filesystem._write_item`` and
    the writer's ``transforms`` / ``serialization_format`` attributes (torch is pinned to 2.13);
    ``tests/checkpoint`` checks both the format (Megatron loads it) and that no chunk outlives its
    write.
    """

    def write_data(self, plan, planner) -> Future:
        file_name = f"{plan.storage_data.prefix}0{_dcp_fs.DEFAULT_SUFFIX}"
        results = []
        with self.fs.create_stream(self.fs.concat_path(self.path, file_name), "wb") as stream:
            for item in plan.items:
                results.append(_dcp_fs._write_item(self.transforms, stream, _resolved(planner, item), item,
                                                   file_name, self.serialization_format))
            if self.sync_files:
                os.fsync(stream.fileno())
        future: Future = Future()
        future.set_result(results)
        return future


def _resolved(planner, item: WriteItem):
    data = planner.resolve_data(item)
    if isinstance(data, torch.Tensor) and data.untyped_storage().nbytes() != data.nbytes:
        data = data.clone()  # torch.save writes a view's whole storage
    return data


def write_tensors(out_dir: Path, tensors: list[GlobalTensor], chunk_fn: ChunkFn,
                  objects: Optional[dict[str, Any]] = None) -> None:
    """Write the DCP part (``*.distcp`` + ``.metadata``) of a checkpoint into ``out_dir``.

    ``chunk_fn(spec, chunk)`` returns the data of one chunk; it is called once per chunk, in an order
    DCP chooses, and its result is written and dropped before the next call. ``objects`` are small
    picklable values stored as DCP byte items (Megatron's ``ShardedObject``s, keyed by unique key).
    """
    state: dict[str, Any] = {t.key: _LazyGlobalTensor(t, chunk_fn) for t in tensors}
    state.update(objects or {})
    writer = _OneAtATimeWriter(str(out_dir), single_file_per_rank=True)
    dcp.save(state, storage_writer=writer, planner=DefaultSavePlanner(flatten_state_dict=False), no_dist=True)


def finalize_megatron_dir(out_dir: Path) -> None:
    """Write ``common.pt`` (empty common state) then ``metadata.json``: the checkpoint is complete."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    torch.save({}, Path(out_dir) / "common.pt")
    save_config(CheckpointingConfig(*MEGATRON_BACKEND), str(out_dir))


# ---- reading --------------------------------------------------------------------------------------

class _ChunkTarget(torch.Tensor):
    """A load target covering one box of a global tensor; DCP fills ``buffer`` from every stored
    chunk that overlaps the box (whatever TP/PP layout wrote them)."""

    @staticmethod
    def __new__(cls, global_shape: torch.Size, chunk: Chunk, buffer: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(cls, global_shape, dtype=buffer.dtype, device="cpu")

    def __init__(self, global_shape: torch.Size, chunk: Chunk, buffer: torch.Tensor):
        self._chunk, self._buffer = chunk, buffer

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [_storage_chunk(self._chunk)]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self._buffer

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"{cls.__name__} only receives chunks from DCP; {func} is not supported")


class _CachingReader(dcp.FileSystemReader):
    """``FileSystemReader`` that unpickles ``.metadata`` once, not once per chunk read."""

    _metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class DistCheckpointReader:
    """Random access to the tensors of a Megatron ``torch_dist`` checkpoint, one chunk at a time."""

    def __init__(self, ckpt_dir: str | Path):
        self.path = Path(ckpt_dir)
        check_megatron_dir(self.path)
        self._reader = _CachingReader(str(self.path))
        metadata = self._reader.read_metadata()
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        self.objects: list[str] = [k for k, v in metadata.state_dict_metadata.items()
                                   if not isinstance(v, TensorStorageMetadata)]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def is_fully_covered(self, key: str) -> bool:
        """Whether the stored chunks hold every element (DCP forbids overlapping chunks on save)."""
        md = self.tensors[key]
        return sum(_numel(c.sizes) for c in md.chunks) == _numel(md.size)

    def read(self, key: str, chunk: Chunk) -> torch.Tensor:
        """The box ``chunk`` of global tensor ``key``, in the stored dtype."""
        buffer = torch.empty(chunk.sizes, dtype=self.dtype(key))
        target = _ChunkTarget(self.tensors[key].size, chunk, buffer)
        dcp.load({key: target}, storage_reader=self._reader,
                 planner=DefaultLoadPlanner(flatten_state_dict=False), no_dist=True)
        return buffer


def check_megatron_dir(path: Path) -> None:
    """FileNotFoundError / ValueError when ``path`` is not a complete ``torch_dist`` checkpoint."""
    meta = path / "metadata.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{path} is not a complete Megatron distributed checkpoint: no metadata.json "
                                f"(a conversion or save that did not finish?)")
    backend = json.loads(meta.read_text()).get("sharded_backend")
    if backend != MEGATRON_BACKEND[0]:
        raise ValueError(f"{meta}: sharded_backend is {backend!r}; only '{MEGATRON_BACKEND[0]}' is supported")
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: metadata.json is there but DCP's .metadata is missing")
