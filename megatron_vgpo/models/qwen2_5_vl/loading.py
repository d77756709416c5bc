"""Fill this rank's model chunks from a Hugging Face Qwen2.5-VL checkpoint, one tensor at a time.

    load_hf_weights(chunks, "/path/to/Qwen2.5-VL-7B-Instruct")      # safetensors directory
    load_hf_weights(chunks, hf_model.state_dict().items())           # or any (name, tensor) stream

Every rank converts the stream with ``name_mapping`` and keeps what its chunks hold (its pipeline
stages' layers, its TP shard); peak extra memory is one full tensor plus one layer's q/k/v or
gate/up. From a safetensors directory a rank reads only the tensors its stages need (the others are
checked from the file header alone), so a pipeline stage reads about 1/PP of the checkpoint. The
checkpoint is checked against the config before anything is trusted: an unknown tensor, a tensor of
the wrong shape (a checkpoint of another config) or a missing tensor raises a ValueError naming it,
whichever rank would have used it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Union

import torch

from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm

Named = tuple[str, torch.Tensor]
_LOCAL_LAYER = re.compile(r"^language_model\.decoder\.layers\.(\d+)\.")


class _Header:
    """A tensor not read: only its shape (from the safetensors header), for validation."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def iter_safetensors(hf_dir: Union[str, Path], wanted: Callable[[str], bool] = lambda name: True) -> Iterator[Named]:
    """Stream ``(name, tensor)`` from an HF checkpoint directory, one tensor in memory at a time.
    Tensors whose (canonical) name ``wanted`` rejects are not read: a ``_Header`` with their shape
    stands in."""
    from safetensors import safe_open

    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {hf_dir}")
    for file in files:
        with safe_open(str(hf_dir / file), framework="pt") as f:
            for key in f.keys():
                if wanted(nm.canonical_hf_name(key)):
                    yield key, f.get_tensor(key)
                else:
                    yield key, _Header(f.get_slice(key).get_shape())


def expected_hf_shapes(hf_config) -> dict[str, torch.Size]:
    """Every HF tensor (on-disk name) a checkpoint of ``hf_config`` must hold, with its shape.

    Built from the transformers model on the meta device, so it is exact for any Qwen2.5-VL config
    and costs no memory. ``lm_head.weight`` is not required when the embeddings are tied."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration._from_config(hf_config)
    shapes = {nm.canonical_hf_name(k): v.shape for k, v in model.state_dict().items()}
    if hf_config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    return shapes


def global_parameter_names(chunk) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The chunk's parameters under mapping names: layer indices made global (the chunk numbers its
    layers from 0; ``layer_number`` is Megatron's global 1-based index)."""
    layers = chunk.language_model.decoder.layers
    for name, param in chunk.named_parameters():
        match = _LOCAL_LAYER.match(name)
        if match:
            global_index = layers[int(match.group(1))].layer_number - 1
            name = f"{nm.LAYER.format(global_index)}{name[match.end():]}"
        yield name, param


def _needed_by(table: dict, arch) -> Callable[[str], bool]:
    """Whether this rank's chunks (``table``: global Megatron name -> parameter) use an HF tensor."""
    layers = {nm.megatron_layer_index(name) for name in table} - {None}
    has_vision = any(name.startswith(nm.VISION) for name in table)
    embedding = nm.EMBEDDING in table or (arch.tie_embeddings and nm.OUTPUT in table)

    def needed(name: str) -> bool:
        layer = nm.hf_layer_index(name)
        if layer is not None:
            return layer in layers
        if name.startswith("visual."):
            return has_vision
        return {"model.embed_tokens.weight": embedding, "lm_head.weight": nm.OUTPUT in table,
                "model.norm.weight": nm.FINAL_NORM in table}.get(name, True)
    return needed


def _validated(items: Iterable[Named], expected: dict, seen: set, arch) -> Iterator[Named]:
    """Check names and shapes; pass on the tensors that were read (headers stop here)."""
    for name, tensor in items:
        name = nm.canonical_hf_name(name)
        if nm.is_tied_duplicate(name, arch):
            continue
        if name not in expected:
            raise ValueError(f"unexpected tensor '{name}' in the checkpoint: not a parameter of this "
                             f"Qwen2.5-VL config (a checkpoint of another model?)")
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ValueError(f"tensor '{name}' has shape {tuple(tensor.shape)} but the config expects "
                             f"{tuple(expected[name])} (a checkpoint of another config?)")
        seen.add(name)
        if not isinstance(tensor, _Header):
            yield name, tensor


def load_hf_weights(chunks: list, source: Union[str, Path, Iterable[Named]]) -> None:
    """Copy an HF checkpoint (directory or ``(name, tensor)`` stream) into this rank's ``chunks``."""
    arch, groups = chunks[0].arch, chunks[0].groups
    table: dict[str, torch.nn.Parameter] = {}
    for chunk in chunks:
        table.update(global_parameter_names(chunk))
    expected = expected_hf_shapes(chunks[0].hf_config)
    items = iter_safetensors(source, _needed_by(table, arch)) if isinstance(source, (str, Path)) else source
    seen: set[str] = set()
    filled: set[str] = set()
    with torch.no_grad():
        for name, full in nm.hf_to_megatron(_validated(items, expected, seen, arch), arch):
            targets = [name, nm.OUTPUT] if (arch.tie_embeddings and name == nm.EMBEDDING) else [name]
            for target in (t for t in targets if t in table):
                _copy(table[target], nm.shard(target, full, groups.tp_rank, groups.tp_size), target)
                filled.add(target)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ValueError(f"missing tensor(s) in the checkpoint: {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    unfilled = sorted(set(table) - filled)
    if unfilled:
        raise ValueError(f"model parameters not covered by the checkpoint mapping: {unfilled[:6]}")


def _copy(param: torch.nn.Parameter, value: torch.Tensor, name: str) -> None:
    if param.shape != value.shape:
        raise ValueError(f"'{name}': checkpoint shard has shape {tuple(value.shape)}, the model "
                         f"parameter {tuple(param.shape)}")
    param.copy_(value)
