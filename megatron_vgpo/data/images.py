"""Decode dataset images and resize them once, the way Qwen2-VL's ``smart_resize`` does.

An image cell of the EasyR1/verl schema is one of: a ``{"bytes", "path"}`` struct (Hugging Face
``datasets`` Image feature, as in ViRL39K/Geo3K/MMK12 parquet files; ``bytes`` wins when both are
set), raw ``bytes``, or a path string (relative paths resolve against ``image_dir``, or against the
data file's directory when ``image_dir`` is empty).

Why we resize here and then call the processor with ``do_resize=False``: the processor's own
``smart_resize`` uses the bounds of its ``preprocessor_config.json``, not ``data.min_pixels`` /
``data.max_pixels``, and EasyR1's approach (resize to the bounds, then let the processor round to
multiples of 28) resamples twice. Here an image is resampled at most once, to its final size: both
sides multiples of ``patch_size * merge_size`` and the area within ``[min_pixels, max_pixels]``. The
same PIL image goes to the rollout engine; because its size is already a fixed point of
``smart_resize`` for those bounds, an engine that applies ``smart_resize`` with the same bounds (see
``processor_size_overrides``) leaves it unchanged and produces the same image tokens.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

from PIL import Image

# Qwen2-VL's limit (image_processing_qwen2_vl.smart_resize raises beyond it).
MAX_ASPECT_RATIO = 200


class ImageDecodeError(ValueError):
    """An image cell that cannot be turned into a picture (unreadable bytes, missing file, bad cell)."""


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's target size: both sides multiples of ``factor``, area in ``[min_pixels, max_pixels]``,
    aspect ratio kept as closely as possible (same arithmetic as transformers' ``smart_resize``)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ImageDecodeError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds "
                               f"{MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def image_cells(value: Any) -> list:
    """The list of image cells of a row: ``None`` is no image, a single cell becomes a list of one."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _image_bytes_or_path(cell: Any, image_dir: str) -> bytes | str:
    if isinstance(cell, dict):
        if cell.get("bytes") is not None:
            cell = cell["bytes"]
        elif cell.get("path"):
            cell = cell["path"]
        else:
            raise ImageDecodeError("image struct has neither bytes nor path")
    if isinstance(cell, (bytes, bytearray, memoryview)):
        return bytes(cell)
    if isinstance(cell, str):
        path = cell if os.path.isabs(cell) else os.path.join(image_dir, cell)
        if not os.path.isfile(path):
            raise ImageDecodeError(f"image file not found: {path}")
        return path
    raise ImageDecodeError(f"unsupported image cell of type {type(cell).__name__}")


def decode_image(cell: Any, image_dir: str = "") -> Image.Image:
    """Fully decode one image cell into an RGB PIL image (transparent pixels composited on white,
    so diagrams drawn on a transparent background keep their lines visible)."""
    if isinstance(cell, Image.Image):
        image = cell
    else:
        source = _image_bytes_or_path(cell, image_dir)
        try:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            image.load()  # force the full decode now: truncated data fails here, not in the model
        except Exception as e:  # PIL raises several unrelated types (OSError, SyntaxError, ...)
            raise ImageDecodeError(f"{type(e).__name__}: {e}") from e
    if image.width < 1 or image.height < 1:
        raise ImageDecodeError(f"empty image ({image.width}x{image.height})")
    if image.mode in ("RGBA", "LA", "P") and ("A" in image.mode or "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def resize_image(image: Image.Image, factor: int, min_pixels: int, max_pixels: int) -> Image.Image:
    """Resample ``image`` once to its ``smart_resize`` size (bicubic, the processor's default); an image
    already at that size is returned as is."""
    height, width = smart_resize(image.height, image.width, factor, min_pixels, max_pixels)
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


def processor_size_overrides(min_pixels: int, max_pixels: int) -> dict:
    """Image-processor kwargs that make a Qwen2-VL processor (HF, or vLLM's ``mm_processor_kwargs`` /
    ``RolloutRequest.mm_processor_kwargs``) resize with the data bounds, so that it leaves our already
    resized images unchanged. The ``size`` form: HF's image processor reads its ``shortest_edge`` /
    ``longest_edge`` as the pixel bounds, and vLLM's Qwen2-VL processor takes them for its image-token
    count too; the flat ``min_pixels``/``max_pixels`` form is deprecated in transformers."""
    return {"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}}
