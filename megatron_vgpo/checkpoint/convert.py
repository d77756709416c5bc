"""Qwen2.5-VL checkpoint conversion, Hugging Face <-> Megatron-Core distributed checkpoint, streaming.

    hf_to_megatron("Qwen2.5-VL-7B-Instruct", "ckpt/7b-megatron", tp=4, pp=2)
    megatron_to_hf("ckpt/7b-megatron", "ckpt/7b-hf")

The CLIs are ``checkpoint_conversion/hf_to_megatron.py`` and ``megatron_to_hf.py``.

Format decision. The Megatron side is a ``torch_dist`` checkpoint written tensor by tensor through
DCP (``dist_io``), not by building the model and calling ``dist_checkpointing.save``: that would
need the whole model (all TP x PP ranks) in memory, 64 GB for a 32B model in bf16. Global tensors
of a distributed checkpoint do not depend on the layout, so each one (each layer of a stacked
one) is one chunk computed from the HF tensors it comes from; peak memory is one layer's largest
tensor plus its sources. ``--tp/--pp`` are validated against the config and recorded in
``conversion.json``, but the checkpoint loads at ANY layout that fits the model
(``dist_checkpointing.load(model.sharded_state_dict(), dir)``), including the one it was written
for. The HF config, tokenizer and processor files travel inside the checkpoint (``hf_config/``), so
the way back needs nothing else.

Every input is checked against the config before anything is written: a missing tensor, an
unexpected one, or a shape from another config is refused with an error naming it.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch

from megatron_vgpo.checkpoint.dist_io import (Chunk, DistCheckpointReader, GlobalTensor, finalize_megatron_dir,
                                              write_tensors)
from megatron_vgpo.checkpoint.hf_io import (HFCheckpoint, TensorInfo, copy_non_weight_files, plan_shards,
                                            write_safetensors_shards)
from megatron_vgpo.checkpoint.output_dir import atomic_output
from megatron_vgpo.checkpoint.qwen2_5_vl import (VOCAB_KEYS, CheckpointPlan, check_layout, hf_outputs, is_stacked,
                                                 megatron_name, plan_checkpoint)
from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm

HF_CONFIG_DIR = "hf_config"  # inside the Megatron checkpoint: config, tokenizer, processor files
CONVERSION_FILE = "conversion.json"
MODEL_PREFIXES = ("language_model.", "vision.")  # other keys (optimizer state) are not weights
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "auto": None}
DEFAULT_MAX_SHARD_BYTES = 4 * 2**30


def load_hf_config(config_dir: Path):
    from transformers import AutoConfig

    if not (Path(config_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {config_dir}")
    return AutoConfig.from_pretrained(str(config_dir))


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


# ---- HF -> Megatron -------------------------------------------------------------------------------

def check_hf_tensors(hf_config, found: dict[str, TensorInfo]) -> None:
    """ValueError naming the first tensor that is missing, unexpected or of the wrong shape."""
    from megatron_vgpo.models.qwen2_5_vl.loading import expected_hf_shapes

    expected = expected_hf_shapes(hf_config)
    for name, info in found.items():
        canonical = nm.canonical_hf_name(name)
        if canonical not in expected:
            if hf_config.tie_word_embeddings and canonical == "lm_head.weight":
                continue  # a tied checkpoint may store the copy; it is ignored
            raise ValueError(f"unexpected tensor '{name}' in the HF checkpoint: not a parameter of this "
                             f"Qwen2.5-VL config (a checkpoint of another model?)")
        if info.shape != tuple(expected[canonical]):
            raise ValueError(f"tensor '{name}' has shape {info.shape} in the HF checkpoint but the config "
                             f"expects {tuple(expected[canonical])} (a checkpoint of another config?)")
    present = {nm.canonical_hf_name(n) for n in found}
    missing = sorted(set(expected) - present)
    if missing:
        raise ValueError(f"missing tensor '{missing[0]}' in the HF checkpoint"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")


def hf_to_megatron(hf_dir: str | Path, output: str | Path, tp: int = 1, pp: int = 1,
                   dtype: Optional[torch.dtype] = None, force: bool = False, progress: bool = True) -> Path:
    """Convert an HF Qwen2.5-VL directory into a Megatron ``torch_dist`` checkpoint at ``output``.

    ``dtype`` None keeps the stored dtypes. ``tp``/``pp``: the layout the checkpoint is meant for
    (validated and recorded; the checkpoint itself loads at any valid layout).
    """
    hf_dir = Path(hf_dir)
    config = load_hf_config(hf_dir)
    check_layout(config, tp, pp)
    ckpt = HFCheckpoint(hf_dir)
    names = {nm.canonical_hf_name(n): n for n in ckpt.info}
    check_hf_tensors(config, ckpt.info)
    plan = plan_checkpoint(config, {nm.canonical_hf_name(n): i for n, i in ckpt.info.items()}, dtype)
    n_chunks = sum(len(t.chunks) for t in plan.tensors)
    with atomic_output(output, force, hf_dir) as tmp, _progress(n_chunks, "hf -> megatron", progress) as bar:
        copy_non_weight_files(hf_dir, tmp / HF_CONFIG_DIR)

        def chunk_fn(spec: GlobalTensor, chunk: Chunk) -> torch.Tensor:
            data = _megatron_chunk(spec, chunk, plan, lambda n: ckpt.read(names[n]))
            bar.update(1)
            return data

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
            write_tensors(tmp, plan.tensors, chunk_fn, plan.extra_state_objects())
        _write_record(tmp, hf_dir, tp, pp, plan)
        finalize_megatron_dir(tmp)  # last: metadata.json marks the checkpoint complete
    return Path(output)


def _megatron_chunk(spec: GlobalTensor, chunk: Chunk, plan: CheckpointPlan, read) -> torch.Tensor:
    """One chunk (a whole tensor, or one layer of a stacked one) computed from its HF sources."""
    stacked = is_stacked(spec.key)
    layer = chunk.offsets[0] if stacked else None
    name = megatron_name(spec.key, layer)
    sources = [(src, read(src)) for src in nm.hf_sources(name, plan.arch)]
    [(out_name, full)] = list(nm.hf_to_megatron(sources, plan.arch))
    assert out_name == name, (out_name, name)
    full = full.to(spec.dtype)
    return full.unsqueeze(0) if stacked else full


def _write_record(out: Path, hf_dir: Path, tp: int, pp: int, plan: CheckpointPlan) -> None:
    import megatron.core

    record = {
        "format": "megatron-core torch_dist, one chunk per global tensor (per layer when stacked)",
        "model": "qwen2_5_vl",
        "written_for": {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
        "loads_at": "any TP dividing the heads, kv heads and MLP width; any PP dividing the layers",
        "source": str(hf_dir.absolute()),
        "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in plan.tensors}),
        "megatron_core": megatron.core.__version__,
        "torch": torch.__version__,
    }
    (out / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")


# ---- Megatron -> HF -------------------------------------------------------------------------------

def expected_plan(hf_config) -> CheckpointPlan:
    """The checkpoint tensors (shapes; dtypes are the checkpoint's) a model of ``hf_config`` has."""
    from megatron_vgpo.models.qwen2_5_vl.loading import expected_hf_shapes

    shapes = expected_hf_shapes(hf_config)
    return plan_checkpoint(hf_config, {n: TensorInfo(tuple(s), torch.float32) for n, s in shapes.items()})


def check_dist_tensors(plan: CheckpointPlan, reader: DistCheckpointReader) -> list[str]:
    """ValueError naming the first missing, unexpected, misshapen or incomplete model tensor; returns
    the non-model keys (e.g. optimizer state) that will be ignored."""
    expected = plan.by_key()
    model_keys = [k for k in reader.tensors if k.startswith(MODEL_PREFIXES)]
    for key in model_keys:
        if key not in expected:
            raise ValueError(f"unexpected tensor '{key}' in the Megatron checkpoint: not a parameter of this "
                             f"Qwen2.5-VL config (a checkpoint of another model, or tied/untied embeddings?)")
    for key, spec in expected.items():
        if key not in reader.tensors:
            raise ValueError(f"missing tensor '{key}' in the Megatron checkpoint {reader.path}")
        _check_shape(key, reader.shape(key), spec.shape)
        if not reader.is_fully_covered(key):
            raise ValueError(f"tensor '{key}' is only partly stored in {reader.path} (an incomplete save?)")
    return [k for k in reader.tensors if not k.startswith(MODEL_PREFIXES)]


def _check_shape(key: str, found: tuple, expected: tuple) -> None:
    # A training run's checkpoint pads the vocabulary to its TP size; the rows past vocab_size are dropped.
    padded_ok = key in VOCAB_KEYS and found[1:] == expected[1:] and found[0] >= expected[0]
    if found != expected and not padded_ok:
        raise ValueError(f"tensor '{key}' has shape {found} in the Megatron checkpoint but the config expects "
                         f"{expected} (a checkpoint of another config?)")


def refuse_damaged(megatron_dir: Path) -> None:
    """ValueError naming the damaged file of a Megatron checkpoint: a training checkpoint against the
    manifest in its ``complete.json``, any other (``hf_to_megatron``'s) against its own ``metadata.json``
    and ``.metadata`` (file sizes against the storage records). A directory without ``metadata.json``
    is left to ``DistCheckpointReader``'s error (what a killed conversion leaves)."""
    from megatron_vgpo.training.checkpointing import MARKER, CheckpointError, verify_megatron_dir

    if not (megatron_dir / "metadata.json").is_file() and not (megatron_dir / MARKER).is_file():
        return
    try:
        verify_megatron_dir(megatron_dir)
    except CheckpointError as e:
        raise ValueError(f"refusing to convert a damaged checkpoint: {e}") from None


def megatron_to_hf(megatron_dir: str | Path, output: str | Path, dtype: Optional[torch.dtype] = None,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, force: bool = False,
                   hf_config_dir: Optional[str | Path] = None, progress: bool = True) -> Path:
    """Convert a Megatron ``torch_dist`` checkpoint of Qwen2.5-VL into an HF directory at ``output``.

    The config, tokenizer and processor files come from ``hf_config_dir`` (default: the checkpoint's
    ``hf_config/``). ``dtype`` None keeps the stored dtypes. A damaged input is refused first, with
    an error naming the file (``refuse_damaged``).
    """
    megatron_dir = Path(megatron_dir)
    refuse_damaged(megatron_dir)
    reader = DistCheckpointReader(megatron_dir)
    config_dir = Path(hf_config_dir) if hf_config_dir else megatron_dir / HF_CONFIG_DIR
    config = load_hf_config(config_dir)
    plan = expected_plan(config)
    ignored = check_dist_tensors(plan, reader)
    if ignored and progress:
        print(f"megatron_to_hf: ignoring {len(ignored)} non-model tensors (e.g. {ignored[0]})", file=sys.stderr)
    units = _units(plan, reader, dtype)
    shards = plan_shards((outputs for _, outputs in units), max_shard_bytes)
    unit_of = {outputs[0][0]: unit for unit, outputs in units if outputs}
    with atomic_output(output, force, megatron_dir) as tmp, _progress(len(units), "megatron -> hf", progress) as bar:
        copy_non_weight_files(config_dir, tmp)
        _set_config_dtype(tmp / "config.json", {info.dtype for _, outputs in units for _, info in outputs})

        def shard_tensors(shard):
            for name, _ in shard.entries:
                if name in unit_of:
                    yield from _hf_tensors(*unit_of[name], reader, plan.arch, dtype)
                    bar.update(1)

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            write_safetensors_shards(tmp, shards, shard_tensors)
    return Path(output)


def _units(plan: CheckpointPlan, reader: DistCheckpointReader, dtype) -> list:
    """``((key, layer), hf outputs)`` for every chunk to read, layers in order, then the rest."""
    stacked = [t for t in plan.tensors if is_stacked(t.key)]
    other = [t for t in plan.tensors if t not in stacked]
    order = [(t.key, None) for t in other if t.key == nm.EMBEDDING]
    order += [(t.key, i) for i in range(plan.num_layers) for t in stacked]
    order += [(t.key, None) for t in other if t.key != nm.EMBEDDING]
    units = []
    for key, layer in order:
        shape = reader.shape(key)[1:] if layer is not None else reader.shape(key)
        units.append(((key, layer), hf_outputs(key, layer, shape, dtype or reader.dtype(key), plan.arch)))
    return units


def _hf_tensors(key: str, layer: Optional[int], reader: DistCheckpointReader, arch, dtype):
    shape = reader.shape(key)
    if layer is None:
        data = reader.read(key, Chunk((0,) * len(shape), shape))
    else:
        data = reader.read(key, Chunk((layer,) + (0,) * (len(shape) - 1), (1, *shape[1:])))[0]
    if dtype is not None:
        data = data.to(dtype)
    return nm.megatron_to_hf([(megatron_name(key, layer), data)], arch)


def _set_config_dtype(config_json: Path, dtypes: set) -> None:
    """Make config.json's ``dtype`` say what the weights are (when they all share one dtype)."""
    if len(dtypes) != 1:
        return
    cfg = json.loads(config_json.read_text())
    name = str(next(iter(dtypes))).replace("torch.", "")
    key = "torch_dtype" if "torch_dtype" in cfg and "dtype" not in cfg else "dtype"
    if cfg.get(key) != name:
        cfg[key] = name
        config_json.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
