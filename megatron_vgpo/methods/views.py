"""Image views: which pixels a forward pass sees (METHODS_SPEC section 0).

Every view keeps each image's size, so the ``<|image_pad|>`` count, ``image_grid_thw``, the M-RoPE
positions and the token alignment are unchanged: only pixel values differ.

- ``original``: the rollout's images.
- ``mask_patches(p, cell)``: the image split into ``cell x cell`` squares from the top-left (edge
  squares truncated), each blackened (value 0 before normalisation) with probability ``p``; on the
  resized image (``placement="resized"``, VPPO: the 14-px grid is the ViT patch grid) or on the raw
  image before resizing (``"raw"``, PAPO), with one mask per response row (``per="row"``) or per prompt
  (``"prompt"``, shared by its group).
- ``gaussian_noise(t)``: x in [0, 1] per channel, the diffusion schedule of NoisyRollout over 1000
  steps, ``x~ = clamp(sqrt(abar_t) x + sqrt(1 - abar_t) eps, 0, 1)``, stored back as uint8 (rounding
  adds at most half a grey level) [ours].

Randomness is seeded from ``(seed, step, key)`` alone (``key``: the prompt's row id, plus the row's
position in the step for per-row views), so every tensor-parallel rank, every pipeline stage and a
resumed run perturb identically, whatever the batch layout.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Sequence

import torch
from PIL import Image

from megatron_vgpo.models.qwen2_5_vl.pixels import PixelSpec, to_uint8


DIFFUSION_STEPS = 1000


@dataclass(frozen=True)
class ImageView:
    """One view of the images (see the module docstring)."""

    kind: Literal["original", "mask_patches", "gaussian_noise"] = "original"
    p: float = 0.0  # mask_patches: probability of blackening a cell
    cell: int = 14  # mask_patches: cell side in pixels
    placement: Literal["resized", "raw"] = "resized"  # mask_patches: where the mask is applied
    per: Literal["row", "prompt"] = "row"  # one perturbation per response row, or per prompt
    noise_step: int = 0  # gaussian_noise: diffusion step t in [0, 999]

    def __post_init__(self):
        if self.kind not in ("original", "mask_patches", "gaussian_noise"):
            raise ValueError(f"unknown image view kind {self.kind!r}")
        if not 0.0 <= self.p <= 1.0 or self.cell < 1 or not 0 <= self.noise_step < DIFFUSION_STEPS:
            raise ValueError(f"invalid image view {self}")

    @property
    def key(self) -> str:
        if self.kind == "original":
            return "original"
        if self.kind == "mask_patches":
            return f"mask_patches(p={self.p:g},cell={self.cell},{self.placement},per_{self.per})"
        return f"gaussian_noise(t={self.noise_step},per_{self.per})"

    @property
    def per_row(self) -> bool:
        return self.kind != "original" and self.per == "row"


ORIGINAL = ImageView()


def view_generator(seed: int, step: int, key: str) -> torch.Generator:
    """A CPU generator seeded from ``(seed, step, key)`` alone (stable across processes and runs)."""
    digest = hashlib.sha256(f"megatron_vgpo-view/{seed}/{step}/{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def mask_patches(image: torch.Tensor, p: float, cell: int, generator: torch.Generator) -> torch.Tensor:
    """``[3, H, W]`` uint8 -> the same with each ``cell x cell`` square (from the top-left, edge squares
    truncated) set to 0 with probability ``p``."""
    _, h, w = image.shape
    keep = torch.rand(math.ceil(h / cell), math.ceil(w / cell), generator=generator) >= p
    keep = keep.repeat_interleave(cell, 0).repeat_interleave(cell, 1)[:h, :w]
    return image * keep.to(image.device, torch.uint8)


@lru_cache(maxsize=1)
def diffusion_alpha_bar() -> torch.Tensor:
    """``abar_t = prod_{j <= t} (1 - beta_j)``, ``beta = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5``
    (NoisyRollout's schedule), float64 ``[1000]``."""
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS, dtype=torch.float64)) * (5e-3 - 1e-5) + 1e-5
    return torch.cumprod(1.0 - betas, dim=0)


def gaussian_noise(image: torch.Tensor, t: int, generator: torch.Generator) -> torch.Tensor:
    """``[3, H, W]`` uint8 -> noised at diffusion step ``t`` (see the module docstring), uint8."""
    abar = float(diffusion_alpha_bar()[t])
    x = image.double() / 255.0
    eps = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    noisy = (math.sqrt(abar) * x + math.sqrt(1.0 - abar) * eps).clamp(0.0, 1.0)
    return (noisy * 255.0).round().to(torch.uint8)


def perturb(view: ImageView, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Apply ``view`` to one uint8 image at its final size (``placement="resized"`` and noise)."""
    if view.kind == "mask_patches":
        return mask_patches(image, view.p, view.cell, generator)
    if view.kind == "gaussian_noise":
        return gaussian_noise(image, view.noise_step, generator)
    return image


def perturbed_images(view: ImageView, example, spec: PixelSpec, seed: int, step: int, key: str) -> list[torch.Tensor]:
    """``example``'s images (a ``PromptExample``) under ``view``, as uint8 ``[3, H, W]`` at their final
    sizes, seeded from ``(seed, step, key)``. A raw-placed mask is drawn on the decoded image, which
    is then resized once to the final size (as the unmasked image was)."""
    generator = view_generator(seed, step, key)
    if view.kind == "mask_patches" and view.placement == "raw":
        out = []
        for raw, (_, gh, gw) in zip(example.load_images(raw=True), example.image_grid_thw.tolist()):
            masked = Image.fromarray(mask_patches(to_uint8(raw), view.p, view.cell, generator).permute(1, 2, 0).numpy())
            size = (gw * spec.patch_size, gh * spec.patch_size)
            out.append(to_uint8(masked if masked.size == size else masked.resize(size, Image.Resampling.BICUBIC)))
        return out
    return [perturb(view, to_uint8(image), generator) for image in example.load_images()]


def view_row_images(view: ImageView, prompts: Sequence, rows: Sequence[int], spec: PixelSpec, *, seed: int,
                    step: int, load_pixels: bool):
    """``RowImages`` of ``prompts`` (one per row; ``rows`` their positions in the step) under ``view``.
    The original view and per-prompt views store each prompt's images once; per-row views one copy
    per row."""
    from megatron_vgpo.training.micro_batch import RowImages

    if view.kind == "original":
        return RowImages.from_prompts(prompts, spec, load_pixels)

    keys = [p.row_id if view.per == "prompt" else f"{p.row_id}/row{r}" for p, r in zip(prompts, rows)]
    return RowImages.from_prompts(prompts, spec, load_pixels, keys=keys,
                                  loader=lambda i: perturbed_images(view, prompts[i], spec, seed, step, keys[i]))
