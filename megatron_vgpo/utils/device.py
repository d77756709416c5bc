"""The training device: which one a run uses, and the few device calls that must be no-ops on a CPU.

``trainer.device`` names it: ``auto`` takes this rank's GPU (``LOCAL_RANK``) when CUDA is available and
the CPU otherwise; ``cuda`` and ``cpu`` insist. Megatron-Core allocates on the current CUDA device
whenever CUDA is available, so a CPU run on a machine with GPUs would mix devices: it is refused
with the way out (hide the GPUs) instead.
"""

from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    """The ``torch.device`` of ``trainer.device`` for this rank (see the module docstring)."""
    cuda = torch.cuda.is_available()
    if name not in ("auto", "cuda", "cpu"):
        raise ValueError(f"trainer.device={name!r} is invalid: must be one of auto, cuda, cpu")
    if name == "cuda" and not cuda:
        raise ValueError("trainer.device=cuda but CUDA is not available on this machine (no GPU or a CPU build "
                         "of torch): use trainer.device=cpu or auto")
    if name == "cpu" and cuda:
        raise ValueError("trainer.device=cpu on a machine with CUDA: Megatron-Core allocates on the GPU whenever "
                         "one is visible; hide the GPUs (CUDA_VISIBLE_DEVICES=) or use trainer.device=cuda/auto")
    if cuda:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def empty_cache() -> None:
    """Return the CUDA caching allocator's free blocks to the device (before another process or
    library, e.g. the rollout engine, allocates); nothing to do on a CPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
