"""Hugging Face checkpoint directories, read and written one tensor at a time.

Reading: ``HFCheckpoint`` knows every tensor's file, shape and dtype from the safetensors headers
alone, and reads a single tensor on request (the file is opened for that read and closed after, so
its memory map never keeps the whole checkpoint resident).

Writing: ``write_safetensors_shards`` writes shards of bounded size plus
``model.safetensors.index.json``. A safetensors file is an 8-byte header length, a JSON header with
every tensor's dtype, shape and byte range, then the raw bytes in that order. All shapes and dtypes
are known before any data is computed, so each header is written first and the tensors are streamed
after it: peak memory is one tensor, not one shard (``safetensors.torch.save_file`` needs the whole
shard in memory).

Also: which files of an HF directory are not weights (config, tokenizer, processor, chat template),
copied verbatim between the HF directory and the Megatron checkpoint's ``hf_config/``.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
              "U8": torch.uint8, "BOOL": torch.bool}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class HFCheckpoint:
    """The safetensors weights of an HF checkpoint directory (sharded with an index, or not)."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.path = Path(hf_dir)
        files = self._weight_files()
        self.file_of: dict[str, str] = {}
        self.info: dict[str, TensorInfo] = {}
        for file in files:
            with safe_open(str(self.path / file), framework="pt") as f:
                for name in f.keys():
                    view = f.get_slice(name)
                    self.file_of[name] = file
                    self.info[name] = TensorInfo(tuple(view.get_shape()), _ST_DTYPES[view.get_dtype()])

    def _weight_files(self) -> list[str]:
        index = self.path / INDEX_FILE
        if index.exists():
            return sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {self.path}")
        return files

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path / self.file_of[name]), framework="pt") as f:
            return f.get_tensor(name)


# ---- writing --------------------------------------------------------------------------------------

@dataclass
class _Shard:
    file: str
    entries: list[tuple[str, TensorInfo]]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(info) for _, info in self.entries)


def _nbytes(info: TensorInfo) -> int:
    n = torch.empty((), dtype=info.dtype).element_size()
    for s in info.shape:
        n *= s
    return n


def plan_shards(groups: Iterable[list[tuple[str, TensorInfo]]], max_shard_bytes: int) -> list[_Shard]:
    """Pack groups of tensors (kept together) into shards of at most ``max_shard_bytes`` each (a group
    larger than that gets a shard of its own), named like ``save_pretrained``'s."""
    shards: list[list[tuple[str, TensorInfo]]] = [[]]
    size = 0
    for group in groups:
        group_bytes = sum(_nbytes(info) for _, info in group)
        if shards[-1] and size + group_bytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += group_bytes
    n = len(shards)
    return [_Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", entries) for i, entries in enumerate(shards)]


def _header(entries: list[tuple[str, TensorInfo]]) -> bytes:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, info in entries:
        end = offset + _nbytes(info)
        header[name] = {"dtype": _ST_NAMES[info.dtype], "shape": list(info.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors_shards(out_dir: Path, shards: list[_Shard],
                             tensors: Callable[[_Shard], Iterator[tuple[str, torch.Tensor]]]) -> None:
    """Write ``shards`` and the index. ``tensors(shard)`` yields that shard's ``(name, tensor)`` in
    any order; each is checked against the plan and written at its place in the file."""
    weight_map = {}
    for shard in shards:
        _write_shard(out_dir / shard.file, shard, tensors(shard))
        weight_map.update({name: shard.file for name, _ in shard.entries})
    total = sum(s.nbytes for s in shards)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _write_shard(path: Path, shard: _Shard, items: Iterator[tuple[str, torch.Tensor]]) -> None:
    header = _header(shard.entries)
    where, offset = {}, len(header)
    for name, info in shard.entries:
        where[name] = (offset, info)
        offset += _nbytes(info)
    written = set()
    with open(path, "wb") as f:
        f.write(header)
        for name, tensor in items:
            start, info = where[name]
            if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
                raise RuntimeError(f"'{name}' came out as {tuple(tensor.shape)} {tensor.dtype}, "
                                   f"planned {info.shape} {info.dtype}")
            f.seek(start)
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            written.add(name)
    missing = [name for name, _ in shard.entries if name not in written]
    if missing:
        raise RuntimeError(f"{path.name}: tensors planned but never produced: {missing[:6]}")


# ---- non-weight files -----------------------------------------------------------------------------

def non_weight_files(hf_dir: Path) -> list[Path]:
    """Config, generation config, tokenizer, processor, chat template, README: every top-level file
    that is not a weight file or a weight index."""
    return sorted(p for p in Path(hf_dir).iterdir()
                  if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES) and not p.name.endswith(".index.json"))


def copy_non_weight_files(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for path in non_weight_files(src):
        shutil.copy2(path, dst / path.name)
