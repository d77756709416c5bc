"""Run micro-batches through this rank's Qwen2.5-VL chunks with Megatron's pipeline schedule.

A thin, typed wrapper over ``megatron.core.pipeline_parallel.get_forward_backward_func`` for the
policy: every stage receives the same micro-batch (each stage recomputes its M-RoPE position ids
from it), the forward step moves it to the model's device (``batch.to(device)``: only the
micro-batch in flight is ever on the device), the last stage hands the ``PolicyOutput`` of each
micro-batch to ``loss_fn``, and the extras ``loss_fn`` returns come back, per micro-batch, on the
last stage (an empty list elsewhere).

A micro-batch is any ``PipelineBatch``: ``PolicyBatch`` (plain model inputs: parity checks, tools)
or the trainer's ``training.micro_batch.MicroBatch`` (model inputs plus named loss inputs). The
``batches`` argument may be any re-iterable sequence (a lazily built one included): with a virtual
pipeline each model chunk iterates it once.

``loss_fn(batch, output) -> (loss, num_tokens, extras)``: ``batch`` is the micro-batch on the device;
``loss`` is back-propagated as is (the policy's ``TransformerConfig`` sets ``calculate_per_token_loss``,
so the schedule does not divide it); ``num_tokens`` (a tensor on the device) is what Megatron's
``finalize_model_grads`` divides gradients by, if the caller uses it; ``extras`` is anything
(detached tensors, dicts).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class PipelineBatch(Protocol):
    def to(self, device: torch.device) -> "PipelineBatch":
        """The same micro-batch with every tensor on ``device``."""
        ...

    def model_inputs(self) -> dict:
        """Keyword arguments of ``Qwen25VLChunk.forward`` (tensors already on the model's device)."""
        ...


@dataclass
class PolicyBatch:
    """Plain model inputs of one micro-batch, identical on every pipeline stage. Shapes as
    ``Qwen25VLChunk.forward``."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: Optional[torch.Tensor] = None  # [B, L], right padding
    pixel_values: Optional[torch.Tensor] = None  # [N_patches, C*T*P*P]
    image_grid_thw: Optional[torch.Tensor] = None  # [N_images, 3]
    target_ids: Optional[torch.Tensor] = None  # [B, L]; None: input_ids shifted left

    def to(self, device: torch.device) -> "PolicyBatch":
        return replace(self, **{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def model_inputs(self) -> dict:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, pixel_values=self.pixel_values,
                    image_grid_thw=self.image_grid_thw, target_ids=self.target_ids)


def _to(value, device: torch.device):
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def model_device(chunk) -> torch.device:
    """The device of a model chunk's parameters (through Megatron's wrappers)."""
    return next(chunk.parameters()).device


def run_pipeline(chunks: list, batches: Sequence[PipelineBatch], loss_fn: Callable, forward_only: bool = False,
                 compute_entropy: bool = False, return_hidden_states: bool = True,
                 device: Optional[torch.device] = None) -> list:
    """Forward (and backward unless ``forward_only``) all ``batches`` through ``chunks``.

    Each micro-batch is moved to ``device`` (default: the chunks' parameter device) as it enters the
    forward step. Gradients accumulate in the parameters' ``.grad`` (no DDP, no optimizer step here).
    Returns the per-micro-batch ``extras`` of ``loss_fn`` on the last pipeline stage, ``[]`` on other
    stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    device = device if device is not None else model_device(chunks[0])

    def forward_step(data_iterator, model):
        batch = next(data_iterator).to(device)
        output = model(**batch.model_inputs(), compute_entropy=compute_entropy,
                       return_hidden_states=return_hidden_states)
        return output, lambda out: loss_fn(batch, out)

    n_chunks = len(chunks)
    iterators = [iter(batches) for _ in range(n_chunks)]
    first = batches[0].input_ids  # shape hints only (variable_seq_lengths: shapes travel with the tensors)
    return list(get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if n_chunks > 1 else iterators[0],
        model=chunks if n_chunks > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=first.shape[1],
        micro_batch_size=first.shape[0],
        forward_only=forward_only,
    ))
