"""Device-side image preprocessing (``models/qwen2_5_vl/pixels.py``) against the HF Qwen2-VL processor:
the uint8 images the trainer keeps must become exactly the patches the processor makes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_vgpo.models.qwen2_5_vl.pixels import PixelSpec, patchify, patchify_all, to_uint8


@pytest.fixture(scope="module")
def image_processor(tmp_path_factory):
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor, write_tiny_checkpoint

    return load_processor(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")).image_processor


def random_images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.mark.parametrize("sizes", [[(56, 56)], [(56, 84), (112, 56), (28 * 5, 28 * 3)]])
def test_patches_equal_the_hf_processor(image_processor, sizes):
    """Bit for bit against transformers' torch backend (the processor when torchvision is installed:
    same fused rescale-and-normalise); within float32 rounding against its PIL/numpy backend (the
    processor without torchvision, e.g. a bare Python 3.12 install), which rescales and normalises in
    two roundings."""
    images = random_images(sizes)
    ref = image_processor(images=images, do_resize=False, return_tensors="pt")
    pixel_values, grid = patchify_all([to_uint8(im) for im in images], PixelSpec.from_processor(image_processor))
    assert torch.equal(grid, ref["image_grid_thw"]) and pixel_values.dtype == torch.float32
    if type(image_processor).__name__.endswith("Pil"):
        torch.testing.assert_close(pixel_values, ref["pixel_values"], atol=1e-6, rtol=0)
    else:
        assert torch.equal(pixel_values, ref["pixel_values"])


def test_spec_from_processor_and_token_counts(image_processor):
    spec = PixelSpec.from_processor(image_processor)
    assert (spec.patch_size, spec.temporal_patch_size, spec.merge_size, spec.factor) == (14, 2, 2, 28)
    assert spec.grid(56, 84) == (1, 4, 6) and spec.num_tokens(56, 84) == 6  # 4 x 6 patches, 2 x 2 merged
    with pytest.raises(ValueError, match="multiples of 28"):
        spec.grid(56, 70)


def test_uint8_is_a_third_of_a_byte_per_patch_value():
    """3 bytes per pixel kept on the host; the processor's float32 patches take 24 (4 B x 3 channels x
    2 temporal frames): 8x more, made on the device per micro-batch only."""
    image = to_uint8(random_images([(56, 56)])[0])
    assert image.dtype == torch.uint8 and image.shape == (3, 56, 56)
    patches = patchify(image, PixelSpec())
    assert patches.numel() * patches.element_size() == 8 * image.numel() * image.element_size()


def test_to_uint8_matches_the_pil_pixels():
    im = random_images([(28, 56)])[0]
    assert torch.equal(to_uint8(im).permute(1, 2, 0), torch.from_numpy(np.asarray(im)))
    assert torch.equal(to_uint8(im.convert("RGBA")), to_uint8(im))  # converted to RGB first
