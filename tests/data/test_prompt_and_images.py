"""The paper's prompt through the chat template, and image decoding/resizing without double resizing."""

import io

import pytest
import torch
from PIL import Image

from megatron_vgpo.data.images import (ImageDecodeError, decode_image, processor_size_overrides, resize_image,
                                       smart_resize)
from megatron_vgpo.data.prompt import INSTRUCTION, PROMPT_TEMPLATE, build_messages, render_prompt
from tests.data.conftest import png

PAPER_INSTRUCTION = ("You first think through the reasoning process as an internal monologue, enclosed within "
                     "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}.")


def test_instruction_is_the_papers_with_two_newlines():
    assert INSTRUCTION == PAPER_INSTRUCTION
    assert PROMPT_TEMPLATE == "{problem}\n\n" + PAPER_INSTRUCTION


def test_prompt_text_exactly(processor):
    text = render_prompt(processor, "<image>Find x in the figure.")
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find x in the figure.\n\n"
        + PAPER_INSTRUCTION + "<|im_end|>\n<|im_start|>assistant\n")


def test_placeholders_become_image_parts_in_place(processor):
    messages = build_messages("Compare <image> and <image>: which is larger?")
    assert [p["type"] for p in messages[1]["content"]] == ["text", "image", "text", "image", "text"]
    text = render_prompt(processor, "Compare <image> and <image>: which is larger?")
    assert "Compare <|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|>: " \
           "which is larger?\n\n" in text
    assert "<image>" not in text


@pytest.mark.parametrize("h,w", [(56, 56), (50, 61), (1000, 30), (3000, 4000), (20, 20), (28, 700), (333, 444)])
@pytest.mark.parametrize("bounds", [(3136, 200704), (262144, 4194304)])
def test_smart_resize_matches_transformers(h, w, bounds):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    assert smart_resize(h, w, 28, *bounds) == hf_smart_resize(h, w, 28, *bounds)
    rh, rw = smart_resize(h, w, 28, *bounds)
    assert rh % 28 == 0 and rw % 28 == 0 and bounds[0] <= rh * rw <= bounds[1]
    assert smart_resize(rh, rw, 28, *bounds) == (rh, rw)  # a fixed point: a second resize changes nothing


def test_resize_is_a_no_op_at_the_target_size_and_bounded_otherwise():
    img = Image.new("RGB", (56, 84))
    assert resize_image(img, 28, 3136, 200704) is img
    big = resize_image(Image.new("RGB", (1000, 700)), 28, 3136, 112 * 112)
    assert big.width % 28 == 0 and big.height % 28 == 0 and big.width * big.height <= 112 * 112
    small = resize_image(Image.new("RGB", (30, 20)), 28, 262144, 4194304)
    assert small.width * small.height >= 262144


@pytest.mark.filterwarnings("ignore:Passing `min_pixels` and `max_pixels`:FutureWarning")
def test_processor_would_not_resize_our_images_again(processor):
    """Our single resize + do_resize=False equals what the processor (or vLLM) computes when told the
    same bounds: no double resampling, and the same image tokens on both sides."""
    src = Image.open(io.BytesIO(png(97, 61, (10, 200, 90))))
    bounds = (56 * 56, 112 * 112)
    ours = resize_image(decode_image(src), 28, *bounds)
    a = processor.image_processor(images=[ours], do_resize=False, return_tensors="pt")
    b = processor.image_processor(images=[ours], **processor_size_overrides(*bounds), return_tensors="pt")
    c = processor.image_processor(images=[ours], size={"shortest_edge": bounds[0], "longest_edge": bounds[1]},
                                  return_tensors="pt")
    for other in (b, c):
        assert torch.equal(a["image_grid_thw"], other["image_grid_thw"])
        assert torch.allclose(a["pixel_values"], other["pixel_values"], atol=1e-5)


def test_decode_image_cells(tmp_path):
    data = png(30, 20)
    (tmp_path / "img.png").write_bytes(data)
    for cell in (data, {"bytes": data, "path": "ignored.png"}, {"bytes": None, "path": "img.png"}, "img.png",
                 str(tmp_path / "img.png")):
        img = decode_image(cell, str(tmp_path))
        assert img.size == (30, 20) and img.mode == "RGB"


def test_transparent_pixels_become_white():
    img = decode_image(png(8, 8, (0, 0, 0, 0), mode="RGBA"))
    assert img.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("cell,match", [
    (b"not an image", "UnidentifiedImageError"),
    (png()[:60], "OSError|SyntaxError"),  # truncated: the header parses, the pixels do not
    ({"bytes": None, "path": None}, "neither bytes nor path"),
    ("missing.png", "not found"),
    (42, "unsupported image cell"),
])
def test_undecodable_cells_raise_a_named_error(cell, match, tmp_path):
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(cell, str(tmp_path))
