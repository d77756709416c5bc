"""Qwen2-VL image preprocessing on the device: compact uint8 images in, the vision tower's patches out.

The trainer keeps rollout images as uint8 RGB, ``[3, H, W]`` at their final (smart-resized) size:
3 bytes per pixel, where the HF processor's float32 patches take 24 (4 bytes x 3 channels x the
temporal patch of 2 frames). ``patchify`` turns them into exactly what
``Qwen2VLImageProcessor(do_resize=False)`` returns, on whatever device the image is on, so the 8x
larger float tensor exists only on the GPU, one micro-batch at a time.

Parity with transformers: the same operations in the same order as its torch backend
(``image_processing_backends.rescale_and_normalize``, fused: ``(x - mean / r) / (std / r)`` in
float32 with ``r`` the rescale factor, then ``Qwen2VLImageProcessor.patchify``: each frame repeated
``temporal_patch_size`` times, patches ordered merge-window by merge-window). ``tests/models/test_pixels.py``
checks bit equality with the processor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image


@dataclass(frozen=True)
class PixelSpec:
    """The image processor's constants that turn pixels into patches."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    rescale_factor: float = 1 / 255

    @classmethod
    def from_processor(cls, image_processor) -> "PixelSpec":
        """The constants of a Qwen2-VL image processor (``processor.image_processor``)."""
        if not (image_processor.do_rescale and image_processor.do_normalize):
            raise ValueError("the image processor must rescale and normalise (do_rescale, do_normalize): "
                             "patchify reproduces only that configuration")
        return cls(patch_size=image_processor.patch_size, temporal_patch_size=image_processor.temporal_patch_size,
                   merge_size=image_processor.merge_size, image_mean=tuple(image_processor.image_mean),
                   image_std=tuple(image_processor.image_std), rescale_factor=image_processor.rescale_factor)

    @property
    def factor(self) -> int:
        """Image sides must be multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size

    def grid(self, height: int, width: int) -> tuple[int, int, int]:
        """``(t, h, w)`` patch grid of an image of ``height x width`` pixels (t = 1 for an image)."""
        if height % self.factor or width % self.factor:
            raise ValueError(f"image of {height}x{width} pixels: both sides must be multiples of {self.factor} "
                             f"(resize it with smart_resize first)")
        return 1, height // self.patch_size, width // self.patch_size

    def num_tokens(self, height: int, width: int) -> int:
        """Merged image tokens (``<|image_pad|>`` count) of an image of ``height x width`` pixels."""
        _, h, w = self.grid(height, width)
        return h * w // self.merge_size ** 2


def to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> ``[3, H, W]`` uint8 tensor (what torchvision's ``pil_to_tensor`` gives)."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3) \
        .permute(2, 0, 1).contiguous()


def patchify(image: torch.Tensor, spec: PixelSpec) -> torch.Tensor:
    """One ``[3, H, W]`` uint8 image -> ``[h * w, 3 * t * p * p]`` float32 patches on its device.

    ``h = H / p``, ``w = W / p`` (``p`` the patch size, ``t`` the temporal patch size); rows ordered as
    the HF processor orders them (merge window by merge window), which the vision tower expects.
    """
    channels, height, width = image.shape
    _, gh, gw = spec.grid(height, width)
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    scale = 1.0 / spec.rescale_factor
    mean = (torch.tensor(spec.image_mean, device=image.device) * scale).view(-1, 1, 1)
    std = (torch.tensor(spec.image_std, device=image.device) * scale).view(-1, 1, 1)
    x = (image.to(torch.float32) - mean) / std
    x = x.reshape(channels, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    return x.unsqueeze(5).expand(-1, -1, -1, -1, -1, t, -1, -1).reshape(gh * gw, channels * t * p * p)


def patchify_all(images: list[torch.Tensor], spec: PixelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Images -> ``(pixel_values [sum of patches, 3 t p p] float32, image_grid_thw [n, 3] int64)``,
    concatenated in order, on the images' device."""
    if not images:
        raise ValueError("patchify_all needs at least one image")
    grids = torch.tensor([spec.grid(im.shape[1], im.shape[2]) for im in images], dtype=torch.long,
                         device=images[0].device)
    return torch.cat([patchify(im, spec) for im in images]), grids
