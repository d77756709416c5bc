"""The Qwen2.5-VL vision tower on the first pipeline stage, and how its output enters the decoder.

We reuse transformers' ``Qwen2_5_VisionTransformerPretrainedModel`` (patch embed, 2-D rotary, window
and full attention blocks, patch merger) as is: parity with Hugging Face holds by construction, and
its parameter names are HF's, so checkpoints pass through the name mapping unchanged.

Parallelism: the tower is REPLICATED on every tensor-parallel rank of the first pipeline stage, not
TP-sharded. Why:
- it is small next to the language model (about 670M parameters at every Qwen2.5-VL size, against
  3B to 72B) and its sequence is short (a few thousand patches), so sharding it saves little;
- replication needs no custom TP kernels for its window attention and merger, and keeps HF's code;
- gradients need no extra TP reduction: every TP rank feeds the same pixels, and the gradient that
  reaches the image embeddings is already complete and identical on the TP ranks (the decoder's
  first column-parallel linear all-reduces its input gradient over TP, and with sequence
  parallelism the scatter's backward all-gathers). The parameters carry no ``tensor_model_parallel``
  attribute, so Megatron treats them as TP-duplicates (counted once in the grad norm) and its DDP
  all-reduces their gradients over data parallelism like any other parameter.
Cost: each TP rank of stage 0 stores and runs the whole tower (a memory and compute duplicate
of ~1.3 GB in bf16); a TP-sharded tower is a later optimisation if stage 0 becomes the bottleneck.

``freeze_vision`` turns ``requires_grad`` off for the whole tower (patch embed, blocks and merger).
With ``model.recompute_activations`` the tower's blocks are recomputed in the backward too (HF's
gradient checkpointing, non-reentrant): without it a block keeps ~65 KB of activations per patch in
bf16 at the 32B size, ~2 MB per patch over 32 blocks, 11 GB for one 1-megapixel image.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megatron_vgpo.utils.deps import has


def vision_attn_implementation() -> str:
    """flash-attn when importable on a GPU, torch SDPA otherwise (HF's two variable-length paths)."""
    return "flash_attention_2" if torch.cuda.is_available() and has("flash_attn") else "sdpa"


def build_vision_tower(vision_config, dtype: torch.dtype, freeze: bool = False,
                       recompute: bool = False) -> torch.nn.Module:
    """A randomly initialised HF vision tower in ``dtype``; weights are loaded afterwards. ``recompute``:
    checkpoint every block (activations recomputed in the backward, in training mode only)."""
    from megatron.core.tensor_parallel import set_defaults_if_not_set_tensor_model_parallel_attributes
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(
        vision_config, attn_implementation=vision_attn_implementation(), dtype=dtype)
    for param in tower.parameters():
        set_defaults_if_not_set_tensor_model_parallel_attributes(param)  # replicated over TP
        param.requires_grad_(not freeze)
    if recompute and not freeze:
        tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return tower


def image_features(tower: torch.nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
    """Merged patch features ``[N_image_tokens, d]`` of all images of the batch, in batch order.

    ``pixel_values``: ``[N_patches, C * T * P * P]`` as the HF image processor flattens them;
    ``image_grid_thw``: ``[N_images, 3]``. Each image gives ``t * h * w / merge**2`` tokens.
    """
    dtype = next(tower.parameters()).dtype
    return tower(pixel_values.to(dtype), grid_thw=image_grid_thw).pooler_output


def distinct_image_grids(image_grid_thw: torch.Tensor, image_index: Sequence[int]) -> torch.Tensor:
    """The grids of the distinct images: ``image_grid_thw [n_slots, 3]`` is per image slot of the batch,
    ``image_index[k]`` the distinct image of slot ``k`` (0, 1, ... in order of first use). -> ``[n_distinct, 3]``"""
    first = {}
    for slot, image in enumerate(image_index):
        first.setdefault(image, slot)
    if sorted(first) != list(range(len(first))):
        raise ValueError(f"image_index {list(image_index)} must number the distinct images 0..n-1")
    return image_grid_thw[[first[j] for j in range(len(first))]]


def features_per_slot(features: torch.Tensor, grid_thw: torch.Tensor, image_index: Sequence[int],
                      merge_size: int) -> torch.Tensor:
    """Merged features of the distinct images ``[N_distinct_tokens, d]`` -> one copy per image slot,
    in slot order ``[N_slot_tokens, d]``: rows sharing an image reuse its one encoding (the gradient
    of every use adds up in the shared features, exactly as if each had been encoded)."""
    per_image = features.split((grid_thw.prod(-1) // merge_size ** 2).tolist())
    return torch.cat([per_image[j] for j in image_index])


def merge_image_features(embeddings: torch.Tensor, input_ids: torch.Tensor, features: torch.Tensor,
                         image_token_id: int) -> torch.Tensor:
    """Replace the ``<|image_pad|>`` embeddings by the image features (out of place, differentiable).

    ``embeddings``: ``[L, B, d]`` (Megatron's sequence-first layout); ``input_ids``: ``[B, L]``;
    ``features``: ``[N, d]`` with N the number of image tokens, filled in batch-major order (row 0's
    images first), exactly as HF's ``masked_scatter`` over ``[B, L, d]``.
    """
    mask = input_ids == image_token_id
    n_tokens = int(mask.sum())
    if n_tokens != features.shape[0]:
        raise ValueError(f"the batch has {n_tokens} <|image_pad|> tokens (id {image_token_id}) but the vision "
                         f"tower produced {features.shape[0]} image features: image_grid_thw does not match "
                         f"the prompts")
    batch_first = embeddings.transpose(0, 1)
    merged = batch_first.masked_scatter(mask.unsqueeze(-1), features.to(embeddings.dtype))
    return merged.transpose(0, 1).contiguous()
