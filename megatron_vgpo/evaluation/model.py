"""The model to evaluate as a Hugging Face directory: as given, or exported from a Megatron checkpoint.

``--model`` may be
- a Hugging Face Qwen2.5-VL directory (``config.json`` at its top): used as is;
- a Megatron ``torch_dist`` checkpoint: a training ``step_N/`` directory, a training ``save_dir``
  (its ``latest`` file names the step), or ``checkpoint_conversion/hf_to_megatron.py`` output.

A Megatron checkpoint is exported ONCE, before the engine starts, with ``checkpoint.convert.
megatron_to_hf`` into ``OUTPUT/hf_model/`` (config, tokenizer and processor from the checkpoint's
``hf_config/`` or ``--hf-config``), and the engine loads that directory. Why export instead of
converting in memory: vLLM loads a directory (it does TP sharding and its CPU weight repacking
itself), and the exported model is what a user would publish; the export streams one tensor at a
time and is reused by a resumed run (``hf_model/source.json`` names the checkpoint it came from).
Delete ``OUTPUT/hf_model`` when done if the disk space matters. Under torchrun rank 0 exports and
the other ranks wait, so OUTPUT must be on a filesystem every rank sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_vgpo.evaluation.benchmarks import EvalError

EXPORT_DIR = "hf_model"
_SOURCE = "source.json"
_MEGATRON_FILES = ("metadata.json", ".metadata")


def megatron_dir(model: Path) -> Optional[Path]:
    """The Megatron checkpoint ``model`` names (following a ``latest`` file), or None for an HF dir."""
    if (model / "config.json").is_file():
        return None
    if (model / "latest").is_file():
        model = model / (model / "latest").read_text().strip()
    if any((model / name).is_file() for name in _MEGATRON_FILES):
        return model
    raise EvalError(f"--model {model}: neither a Hugging Face checkpoint (config.json) nor a Megatron "
                    f"checkpoint (metadata.json, or a save_dir with a 'latest' file)")


def resolve_model(model: str | Path, output: Path, hf_config: str = "", rank: int = 0) -> Path:
    """The HF directory to evaluate; exports a Megatron checkpoint into ``output/hf_model`` (rank 0)."""
    source = megatron_dir(Path(model))
    if source is None:
        return Path(model)
    target = output / EXPORT_DIR
    record = {"megatron_dir": str(source.absolute()), "hf_config": hf_config}
    if rank == 0 and not _exported(target, record):
        _export(source, target, hf_config, record)
    if dist.is_initialized():
        dist.barrier()
    return target


def _exported(target: Path, record: dict) -> bool:
    marker = target / _SOURCE
    return marker.is_file() and json.loads(marker.read_text()) == record


def _export(source: Path, target: Path, hf_config: str, record: dict) -> None:
    from megatron_vgpo.checkpoint.convert import megatron_to_hf

    try:
        megatron_to_hf(source, target, hf_config_dir=hf_config or None, force=True)
    except (FileNotFoundError, ValueError) as e:  # no hf_config/, or a checkpoint of another config
        raise EvalError(f"cannot export the Megatron checkpoint {source}: {e}"
                        f"{'' if hf_config else ' (give --hf-config DIR with config.json and the tokenizer)'}") from e
    (target / _SOURCE).write_text(json.dumps(record, indent=2) + "\n")


def context_length(model_dir: Path) -> Optional[int]:
    """The model's ``max_position_embeddings`` (its text config's, HF 5.x layout, or the top level's)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return (config.get("text_config") or {}).get("max_position_embeddings") or config.get("max_position_embeddings")
