"""Optimizer states and gradient buffers to host memory while the rollout engine runs, and back.

Colocated RL (engine and trainer on the same GPUs) needs the training state only during the update.
``optimizer.offload_during_rollout`` moves what the update alone uses off the device after each update
and back before the next one (verl's and NeMo-RL's Megatron paths do the same):

- the optimizer's tensors: fp32 master weights (mixed precision) and Adam's moments, 12 bytes per
  parameter (sharded over data-parallel ranks by the distributed optimizer). Each is copied into a
  host buffer (pinned on CUDA, so the copies are asynchronous DMA) and the tensor's ``.data`` swapped
  for it, so every reference the optimizer holds stays valid; ``onload`` swaps a device copy back.
  Tensors that share storage with the model's own parameters (a float32 model's optimizer steps the
  parameters themselves) are never moved: the weights are needed by the log-prob pass and the sync.
- the DDP gradient buffers (fp32 main grads, 4 bytes per parameter): freed with Megatron's own
  ``offload_grad_buffers`` (storage resized to 0, every ``main_grad`` view stays valid) and
  reallocated zeroed by ``restore_grad_buffers``: gradients are not needed between updates.

On a CPU machine the moves are real copies between two host buffers: pointless for memory, but the
same code path runs, and the round trip is tested to be bit-exact.
"""

from __future__ import annotations

import torch


def _torch_optimizers(optimizer) -> list:
    """The ``torch.optim`` optimizers inside a Megatron optimizer (chained or not)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    parts = chained if chained is not None else [optimizer]
    return [p.optimizer for p in parts if getattr(p, "optimizer", None) is not None]


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    host.copy_(t, non_blocking=True)
    return host


class OptimizerOffloader:
    """``offload()`` / ``onload()`` the optimizer's tensors and the DDP grad buffers (see the module
    docstring). Both are idempotent; with ``enabled=False`` both do nothing."""

    def __init__(self, optimizer, ddp_chunks: list, device: torch.device, enabled: bool):
        self.optimizer, self.ddp_chunks, self.device, self.enabled = optimizer, ddp_chunks, device, enabled
        self.offloaded = False

    def _tensors(self) -> list[torch.Tensor]:
        model_storage = {p.untyped_storage().data_ptr() for c in self.ddp_chunks for p in c.parameters()}
        out = []
        for opt in _torch_optimizers(self.optimizer):
            for group in opt.param_groups:
                out += [p for p in group["params"] if p.untyped_storage().data_ptr() not in model_storage]
            for state in opt.state.values():
                out += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        return out

    def offload(self) -> None:
        if not self.enabled or self.offloaded:
            return
        cuda = self.device.type == "cuda"
        for t in self._tensors():
            t.data = _host_copy(t.data)
        for chunk in self.ddp_chunks:
            chunk.offload_grad_buffers(synchronize=cuda, empty_cache=cuda)
        if cuda:
            torch.cuda.synchronize()  # the pinned copies are done before the device memory is reused
        self.offloaded = True

    def onload(self) -> None:
        if not self.enabled or not self.offloaded:
            return
        for t in self._tensors():
            t.data = t.data.to(self.device, non_blocking=True)
        for chunk in self.ddp_chunks:
            chunk.restore_grad_buffers(synchronize=self.device.type == "cuda")
        self.offloaded = False
