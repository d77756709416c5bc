"""A fixed multimodal batch and the Hugging Face reference outputs on it, for parity checks.

Used by ``tools/verify_parity.py`` and the tests: Megatron and HF must give the same per-token
log-probs and final hidden states on a batch that exercises every input case at once:

- row 0: one small image (grid 1 x 4 x 4 patches -> 4 image tokens) between text;
- row 1: two images of different sizes in one sample (1 x 6 x 8 -> 12 tokens, then 1 x 4 x 4);
- row 2: text only;
- rows are right-padded to a common length.

``micro_batches`` splits it as a pipeline would see it: rows (0, 2) -- an image row and a padded
text-only row -- then row 1 alone, so the two micro-batches also differ in length.

Token ids are drawn from the text vocabulary below the special ids, so any Qwen2.5-VL config works
(real or tiny). The images are random uint8 pictures (kept in ``images``); ``pixel_values`` are their
patches as the Qwen2-VL processor makes them (``pixels.patchify``). ``compare`` reports max absolute differences over VALID positions only: hidden
states where ``attention_mask`` is 1, log-probs where the target (the next token) is a real token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_vgpo.models.qwen2_5_vl.pixels import PixelSpec, patchify_all

IMAGE_GRIDS = ((1, 4, 4), (1, 6, 8), (1, 4, 4))  # (t, h, w) in patches, batch order
IMAGES_PER_ROW = (1, 2, 0)
MICRO_BATCH_ROWS = ((0, 2), (1,))


@dataclass
class ParityBatch:
    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64, right padding
    pixel_values: torch.Tensor | None  # [N_patches, C * T * P * P]
    image_grid_thw: torch.Tensor | None  # [N_images, 3]
    images_per_row: tuple[int, ...]
    images: tuple = ()  # [N_images] of [3, H, W] uint8, batch order (the whole batch only)

    def targets(self) -> torch.Tensor:
        """Next-token targets ``[B, L]`` (0 at the last column)."""
        return torch.cat([self.input_ids[:, 1:], torch.zeros_like(self.input_ids[:, :1])], dim=1)

    def target_mask(self) -> torch.Tensor:
        """``[B, L]`` bool: the target of position t is a real token."""
        return torch.cat([self.attention_mask[:, 1:], torch.zeros_like(self.attention_mask[:, :1])], dim=1).bool()

    def select(self, rows: tuple[int, ...]) -> "ParityBatch":
        """The sub-batch of ``rows`` (with their images), trimmed to its longest row."""
        first_image = [sum(self.images_per_row[:r]) for r in range(len(self.images_per_row))]
        images = [first_image[r] + i for r in rows for i in range(self.images_per_row[r])]
        pixels = grid = None
        if images:
            patches = self.image_grid_thw.prod(dim=-1)
            starts = torch.cumsum(patches, 0) - patches
            pixels = torch.cat([self.pixel_values[starts[i]: starts[i] + patches[i]] for i in images])
            grid = self.image_grid_thw[images]
        length = int(self.attention_mask[list(rows)].sum(dim=1).max())
        return ParityBatch(self.input_ids[list(rows), :length], self.attention_mask[list(rows), :length],
                           pixels, grid, tuple(self.images_per_row[r] for r in rows))


def _image(grid, merge: int, cfg) -> list[int]:
    """``<|vision_start|>``, one ``<|image_pad|>`` per merged patch, ``<|vision_end|>``."""
    n_pad = grid[0] * grid[1] * grid[2] // merge**2
    return [cfg.vision_start_token_id] + [cfg.image_token_id] * n_pad + [cfg.vision_end_token_id]


def fixed_multimodal_batch(hf_config, seed: int = 0, dtype=torch.float32) -> ParityBatch:
    """The batch described in the module docstring, deterministic per ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    vision = hf_config.vision_config
    merge = vision.spatial_merge_size
    special = min(hf_config.image_token_id, hf_config.vision_start_token_id, hf_config.vision_end_token_id,
                  hf_config.video_token_id)
    high = min(special, hf_config.text_config.vocab_size)

    def text(n):
        return torch.randint(1, high, (n,), generator=gen).tolist()

    rows = [
        text(5) + _image(IMAGE_GRIDS[0], merge, hf_config) + text(4),
        text(3) + _image(IMAGE_GRIDS[1], merge, hf_config) + text(2)
        + _image(IMAGE_GRIDS[2], merge, hf_config) + text(3),
        text(9),
    ]
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    spec = pixel_spec(hf_config)
    images = tuple(torch.randint(0, 256, (3, h * vision.patch_size, w * vision.patch_size), generator=gen,
                                 dtype=torch.uint8) for _, h, w in IMAGE_GRIDS)
    pixel_values, grid = patchify_all(list(images), spec)
    return ParityBatch(input_ids, attention_mask, pixel_values.to(dtype), grid, IMAGES_PER_ROW, images)


def pixel_spec(hf_config) -> PixelSpec:
    """The Qwen2-VL processor's constants for ``hf_config``'s vision tower (default mean and std)."""
    vision = hf_config.vision_config
    return PixelSpec(patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
                     merge_size=vision.spatial_merge_size)


def micro_batches(batch: ParityBatch) -> list[ParityBatch]:
    """The two micro-batches of the module docstring."""
    return [batch.select(rows) for rows in MICRO_BATCH_ROWS]


@torch.no_grad()
def hf_reference(hf_model, batch: ParityBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """HF ``(logprobs [B, L] float32, final hidden states [B, L, d])`` on ``batch``."""
    mm_token_type_ids = (batch.input_ids == hf_model.config.image_token_id).int()
    out = hf_model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                         mm_token_type_ids=mm_token_type_ids, use_cache=False)
    hidden = out.last_hidden_state
    logits = hf_model.lm_head(hidden).float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, batch.targets().unsqueeze(-1)).squeeze(-1)
    return logprobs, hidden


def compare(batch: ParityBatch, logprobs, hidden, ref_logprobs, ref_hidden) -> dict[str, float]:
    """Max absolute differences over valid positions (see the module docstring)."""
    lp_mask, h_mask = batch.target_mask(), batch.attention_mask.bool()
    return {
        "logprobs": (logprobs.float() - ref_logprobs.float())[lp_mask].abs().max().item(),
        "hidden_states": (hidden.float() - ref_hidden.float())[h_mask].abs().max().item(),
    }
