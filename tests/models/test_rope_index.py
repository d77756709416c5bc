"""Tests for the Qwen2.5-VL 3-D M-RoPE position ids (``models/qwen2_5_vl/rope_index.py``).

The reference is transformers' own ``Qwen2_5_VLModel.get_rope_index`` on a tiny randomly initialised
model (only its config matters), run on randomized batches; one hand-computed case pins the rules
down independently of transformers.
"""

from __future__ import annotations

import random

import pytest
import torch

from megatron_vgpo.models.qwen2_5_vl.rope_index import get_rope_index

IMAGE, VIDEO, VSTART, VEND = 60, 61, 58, 59
MERGE = 2
TOKENS_PER_SECOND = 2
PAD = 0


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, bos_token_id=None, eos_token_id=None,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
        ),
        vision_config=dict(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
            spatial_merge_size=MERGE, fullatt_block_indexes=[0], tokens_per_second=TOKENS_PER_SECOND,
        ),
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
    )
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def ours(input_ids, image_grid_thw, attention_mask, **kwargs):
    return get_rope_index(
        input_ids, image_grid_thw, attention_mask,
        spatial_merge_size=MERGE, image_token_id=IMAGE, vision_start_token_id=VSTART, **kwargs,
    )


def hf(model, input_ids, image_grid_thw, attention_mask, video_grid_thw=None, second_per_grid_ts=None):
    # transformers 5.x finds vision tokens through mm_token_type_ids, as its processor builds them.
    mm_token_type_ids = (input_ids == IMAGE).int() + 2 * (input_ids == VIDEO).int()
    return model.model.get_rope_index(
        input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
        second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask,
    )


def build_batch(rows, padding: str, pad_token: int = PAD):
    """rows: per sample, a list of segments ``("text", n)``, ``("image", thw)`` or ``("video", thw)``.

    Returns input_ids, attention_mask (None for ``padding="none"``, where short rows are filled with
    text), image_grid_thw and video_grid_thw (None when empty), in batch order.
    """
    sequences, grids = [], {"image": [], "video": []}
    for segments in rows:
        tokens = []
        for kind, arg in segments:
            if kind == "text":
                tokens += [random.randrange(1, 50) for _ in range(arg)]
            else:
                t, h, w = arg
                grids[kind].append(arg)
                pad_id = IMAGE if kind == "image" else VIDEO
                tokens += [VSTART] + [pad_id] * (t * h * w // MERGE**2) + [VEND]
        sequences.append(tokens)
    length = max(len(s) for s in sequences)
    ids, mask = [], []
    for tokens in sequences:
        n_pad = length - len(tokens)
        if padding == "left":
            ids.append([pad_token] * n_pad + tokens)
            mask.append([0] * n_pad + [1] * len(tokens))
        elif padding == "right":
            ids.append(tokens + [pad_token] * n_pad)
            mask.append([1] * len(tokens) + [0] * n_pad)
        else:
            ids.append(tokens + [random.randrange(1, 50) for _ in range(n_pad)])
    grid = {k: torch.tensor(v, dtype=torch.long) if v else None for k, v in grids.items()}
    attention_mask = None if padding == "none" else torch.tensor(mask, dtype=torch.long)
    return torch.tensor(ids, dtype=torch.long), attention_mask, grid["image"], grid["video"]


def random_rows(rng: random.Random, with_video: bool = False):
    rows = []
    for _ in range(rng.randint(1, 4)):
        segments = [("text", rng.randint(1, 4))]  # >= 1 real token: HF fails on an empty row
        for _ in range(rng.choice([0, 1, 1, 2, 3])):  # 0 -> a text-only row
            kind = "video" if with_video and rng.random() < 0.5 else "image"
            t = rng.randint(1, 3) if kind == "video" else 1
            segments += [(kind, (t, 2 * rng.randint(1, 4), 2 * rng.randint(1, 4))), ("text", rng.randint(0, 3))]
        rows.append(segments)
    return rows


@pytest.mark.parametrize("padding", ["left", "right", "none"])
@pytest.mark.parametrize("seed", range(8))
def test_matches_transformers_on_random_image_batches(hf_model, padding, seed):
    random.seed(seed)
    input_ids, mask, image_grid, _ = build_batch(random_rows(random.Random(seed)), padding)
    expected_pos, expected_delta = hf(hf_model, input_ids, image_grid, mask)
    pos, delta = ours(input_ids, image_grid, mask)
    assert pos.dtype == torch.long and delta.dtype == torch.long
    assert torch.equal(pos, expected_pos)
    assert torch.equal(delta, expected_delta)


def test_matches_transformers_on_the_issue_batch(hf_model):
    """Two image sizes, two images in one sample, a text-only sample, left padding."""
    rows = [
        [("text", 3), ("image", (1, 4, 6)), ("text", 2), ("image", (1, 8, 2)), ("text", 1)],
        [("text", 5)],
        [("text", 1), ("image", (1, 2, 2)), ("text", 4)],
    ]
    for padding in ("left", "right"):
        input_ids, mask, image_grid, _ = build_batch(rows, padding)
        expected = hf(hf_model, input_ids, image_grid, mask)
        got = ours(input_ids, image_grid, mask)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_image_ids_hidden_in_padding_are_ignored(hf_model):
    random.seed(0)
    rows = [[("text", 2), ("image", (1, 4, 4)), ("text", 1)], [("text", 1)]]
    input_ids, mask, image_grid, _ = build_batch(rows, "left", pad_token=IMAGE)
    assert (input_ids[1] == IMAGE).any()
    expected = hf(hf_model, input_ids, image_grid, mask)
    got = ours(input_ids, image_grid, mask)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("seconds", [None, "random"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_transformers_with_videos(hf_model, seed, seconds):
    random.seed(seed)
    input_ids, mask, image_grid, video_grid = build_batch(random_rows(random.Random(seed), True), "right")
    second_per_grid_ts = None
    if seconds == "random" and video_grid is not None:
        second_per_grid_ts = torch.tensor([random.choice([0.5, 1.0, 1 / 3, 2.0]) for _ in video_grid])
    expected = hf(hf_model, input_ids, image_grid, mask, video_grid, second_per_grid_ts)
    got = ours(
        input_ids, image_grid, mask, video_grid_thw=video_grid, video_token_id=VIDEO,
        second_per_grid_ts=second_per_grid_ts, tokens_per_second=TOKENS_PER_SECOND,
    )
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_matches_transformers_on_fractional_video_intervals(hf_model):
    """A 3-step video at 1/3 s per step: interval 2/3, truncated like HF to temporal offsets 0, 0, 1."""
    random.seed(0)
    rows = [[("text", 2), ("video", (3, 4, 4)), ("text", 1), ("image", (1, 2, 4)), ("text", 2)], [("text", 3)]]
    input_ids, mask, image_grid, video_grid = build_batch(rows, "left")
    seconds = torch.tensor([1 / 3])
    expected = hf(hf_model, input_ids, image_grid, mask, video_grid, seconds)
    got = ours(
        input_ids, image_grid, mask, video_grid_thw=video_grid, video_token_id=VIDEO,
        second_per_grid_ts=seconds, tokens_per_second=TOKENS_PER_SECOND,
    )
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    video_start = int(got[0][0, 0][input_ids[0] == VIDEO].min())
    assert sorted(set(got[0][0, 0][input_ids[0] == VIDEO].tolist())) == [video_start, video_start + 1]


def test_hand_computed_positions():
    # Row 0: t t <vs> [1x4x4 grid, merge 2 -> 2x2 = 4 image tokens] t t
    # Row 1: the same after 2 left-padding tokens; row 2: text only, right padded.
    row = [10, 11, VSTART, IMAGE, IMAGE, IMAGE, IMAGE, 12, 13]
    input_ids = torch.tensor([row + [PAD, PAD], [PAD, PAD] + row, [20, 21, 22] + [PAD] * 8])
    mask = torch.tensor([[1] * 9 + [0, 0], [0, 0] + [1] * 9, [1] * 3 + [0] * 8])
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    pos, delta = ours(input_ids, grid, mask)
    #                 t  t  vs  image (s=3)  t  t   (text after image: 3 + max(2, 2) = 5)
    temporal = [0, 1, 2, 3, 3, 3, 3, 5, 6]
    height = [0, 1, 2, 3, 3, 4, 4, 5, 6]
    width = [0, 1, 2, 3, 4, 3, 4, 5, 6]
    for axis, values in enumerate([temporal, height, width]):
        assert pos[axis, 0].tolist() == values + [0, 0]
        assert pos[axis, 1].tolist() == [0, 0] + values
        assert pos[axis, 2].tolist() == [0, 1, 2] + [0] * 8
    # max position 6 + 1 - 9 real tokens; a text-only row has delta 0
    assert delta.tolist() == [[-2], [-2], [0]]


def test_hand_computed_wide_image_and_no_mask():
    # <vs> [1x2x6 grid -> 1x3 tokens] t : width runs 1..3, the next text is 1 + max(1, 3) = 4
    input_ids = torch.tensor([[VSTART, IMAGE, IMAGE, IMAGE, 7]])
    pos, delta = ours(input_ids, torch.tensor([[1, 2, 6]]), None)
    assert pos[:, 0].tolist() == [[0, 1, 1, 1, 4], [0, 1, 1, 1, 4], [0, 1, 2, 3, 4]]
    assert delta.tolist() == [[0]]


def test_text_only_batch_without_grid():
    input_ids = torch.tensor([[PAD, 5, 6], [5, 6, 7]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    pos, delta = ours(input_ids, None, mask)
    assert pos.tolist() == [[[0, 0, 1], [0, 1, 2]]] * 3
    assert delta.tolist() == [[0], [0]]


def test_fully_padded_row_gets_zeros_and_delta_zero():
    # transformers raises on such a row; here it is all zeros with delta 0.
    input_ids = torch.tensor([[VSTART] + [IMAGE] * 4, [PAD] * 5])
    mask = torch.tensor([[1] * 5, [0] * 5])
    pos, delta = ours(input_ids, torch.tensor([[1, 4, 4]]), mask)
    assert pos[:, 1].eq(0).all() and delta.tolist() == [[-2], [0]]


def test_count_mismatch_names_both_counts_and_the_sample():
    row = [VSTART] + [IMAGE] * 4 + [VEND]
    with pytest.raises(ValueError, match=r"4 image_pad tokens.*describes 8.*sample 0"):
        ours(torch.tensor([row]), torch.tensor([[1, 4, 8]]), None)
    # Row 0 is right; row 1 has 3 tokens for a 4-token image.
    batch = torch.tensor([row, [1, VSTART] + [IMAGE] * 3 + [VEND]])
    with pytest.raises(ValueError, match=r"7 image_pad tokens.*describes 8.*sample 1"):
        ours(batch, torch.tensor([[1, 4, 4], [1, 4, 4]]), None)
    with pytest.raises(ValueError, match=r"4 image_pad tokens.*describes 8.*last 1 image"):
        ours(torch.tensor([row]), torch.tensor([[1, 4, 4], [1, 4, 4]]), None)
    with pytest.raises(ValueError, match=r"4 image_pad tokens.*describes 0"):
        ours(torch.tensor([row]), None, None)


def test_grid_not_divisible_by_merge():
    input_ids = torch.tensor([[VSTART] + [IMAGE] * 3])
    with pytest.raises(ValueError, match=r"image 0 has grid .*\[1, 3, 4\].*divisible by spatial_merge_size=2"):
        ours(input_ids, torch.tensor([[1, 3, 4]]), None)


def test_malformed_layouts():
    grid = torch.tensor([[1, 4, 4]])
    with pytest.raises(ValueError, match="does not follow <|vision_start|>"):
        ours(torch.tensor([[5] + [IMAGE] * 4]), grid, None)
    with pytest.raises(ValueError, match="not contiguous"):
        ours(torch.tensor([[VSTART, IMAGE, IMAGE, 5, IMAGE, IMAGE]]), grid, None)
    with pytest.raises(ValueError, match="without tokens_per_second"):
        ours(torch.tensor([[VSTART, VIDEO]]), None, None, video_grid_thw=torch.tensor([[1, 2, 2]]),
             video_token_id=VIDEO)
    with pytest.raises(ValueError, match="without video_token_id"):
        ours(torch.tensor([[5]]), None, None, video_grid_thw=torch.tensor([[1, 2, 2]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        ours(torch.tensor([[5, 6]]), None, torch.ones(1, 3))
