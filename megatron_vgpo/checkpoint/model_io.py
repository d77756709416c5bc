"""Load and save this rank's model chunks from / to a Megatron distributed checkpoint.

    load_model_checkpoint(chunks, "ckpt/7b")     # any checkpoint of this model, written at any TP/PP
    save_model_checkpoint(chunks, "ckpt/step100")

Thin wrappers over ``megatron.core.dist_checkpointing``: every rank of the world calls them
together; each reads or writes only its own shards. Virtual-pipeline chunks go under ``model0``,
``model1``, ... as Megatron-LM does. Checkpoints written by ``checkpoint_conversion/hf_to_megatron.py``
and by ``save_model_checkpoint`` are interchangeable.
"""

from __future__ import annotations

from pathlib import Path

from megatron_vgpo.distributed.cpu_compat import apply_cpu_compat


def _sharded_state_dict(chunks: list) -> dict:
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(chunks)}


def _import_strategies() -> None:
    # dist_checkpointing imports its torch_dist strategy lazily; import it (and patch it on CPU)
    # before the first save or load, so that the CPU patches reach it.
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401

    apply_cpu_compat()


def load_model_checkpoint(chunks: list, ckpt_dir: str | Path) -> None:
    """Fill ``chunks`` (this rank's model chunks) from the checkpoint ``ckpt_dir``."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_vgpo.checkpoint.dist_io import check_megatron_dir

    check_megatron_dir(Path(ckpt_dir))
    _import_strategies()
    try:
        state = dist_checkpointing.load(_sharded_state_dict(chunks), str(ckpt_dir))
    # Shapes, missing keys: the message names the tensor, not the checkpoint. (torch's
    # CheckpointException derives from BaseException.)
    except (Exception, CheckpointException) as e:
        raise ValueError(f"{ckpt_dir}: cannot load this Megatron checkpoint into the model (a checkpoint of "
                         f"another model or config?): {type(e).__name__}: {e}") from e
    if len(chunks) == 1:
        chunks[0].load_state_dict(state, strict=True)
        return
    for i, chunk in enumerate(chunks):
        chunk.load_state_dict(state[f"model{i}"], strict=True)


def save_model_checkpoint(chunks: list, ckpt_dir: str | Path) -> None:
    """Write ``chunks`` of every rank into the (empty or new) directory ``ckpt_dir``."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist.barrier()
    _import_strategies()
    dist_checkpointing.save(_sharded_state_dict(chunks), str(ckpt_dir))
