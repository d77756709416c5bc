"""Run micro-batches through this rank's Qwen2.5-VL chunks with Megatron's pipeline schedule.

A thin, typed wrapper over ``megatron.core.pipeline_parallel.get_forward_backward_func`` for the
policy: every stage receives the same ``PolicyBatch`` (each stage recomputes its M-RoPE position
ids from it), the last stage hands the ``PolicyOutput`` of each micro-batch to ``loss_fn``, and the
extras ``loss_fn`` returns come back, per micro-batch, on the last stage (an empty list elsewhere).

``loss_fn(batch, output) -> (loss, num_tokens, extras)``: ``loss`` is back-propagated as is (the
policy's ``TransformerConfig`` sets ``calculate_per_token_loss``, so the schedule does not divide
it); ``num_tokens`` is what Megatron's ``finalize_model_grads`` divides gradients by, if the caller
uses it; ``extras`` is anything (detached tensors, dicts). Used by parity checks, and as the
building block of the trainer's log-prob and update passes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class PolicyBatch:
    """One micro-batch, identical on every pipeline stage. Shapes as ``Qwen25VLChunk.forward``."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: Optional[torch.Tensor] = None  # [B, L], right padding
    pixel_values: Optional[torch.Tensor] = None  # [N_patches, C*T*P*P]
    image_grid_thw: Optional[torch.Tensor] = None  # [N_images, 3]
    target_ids: Optional[torch.Tensor] = None  # [B, L]; None: input_ids shifted left
    extra: dict = field(default_factory=dict)  # loss inputs (advantages, masks, ...), for loss_fn

    def model_inputs(self) -> dict:
        return dict(input_ids=self.input_ids, attention_mask=self.attention_mask, pixel_values=self.pixel_values,
                    image_grid_thw=self.image_grid_thw, target_ids=self.target_ids)


def run_pipeline(chunks: list, batches: list[PolicyBatch], loss_fn: Callable, forward_only: bool = False,
                 compute_entropy: bool = False, return_hidden_states: bool = True) -> list:
    """Forward (and backward unless ``forward_only``) all ``batches`` through ``chunks``.

    Gradients accumulate in the parameters' ``.grad`` (no DDP, no optimizer step here). Returns the
    per-micro-batch ``extras`` of ``loss_fn`` on the last pipeline stage, ``[]`` on other stages.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(**batch.model_inputs(), compute_entropy=compute_entropy,
                       return_hidden_states=return_hidden_states)
        return output, lambda out: loss_fn(batch, out)

    n_chunks = len(chunks)
    iterators = [iter(batches) for _ in range(n_chunks)]
    first = batches[0].input_ids
    return list(get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if n_chunks > 1 else iterators[0],
        model=chunks if n_chunks > 1 else chunks[0],
        num_microbatches=len(batches),
        seq_length=first.shape[1],  # ignored: variable_seq_lengths is on
        micro_batch_size=first.shape[0],
        forward_only=forward_only,
    ))
