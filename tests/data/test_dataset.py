"""PromptDataset: the EasyR1 schema from parquet/json/jsonl, and every bad input skipped or named."""

import logging

import pytest
import torch

from megatron_vgpo.data import (MissingColumnError, NoUsableExamplesError, PromptDataset, build_val_dataset,
                                iter_val_batches)
from megatron_vgpo.data.dataset import (SKIP_ANSWER, SKIP_IMAGE, SKIP_PLACEHOLDERS, SKIP_PROBLEM, SKIP_TOO_LONG,
                                        coerce_answer)
from megatron_vgpo.data.synthetic import SyntheticOptions, write_synthetic_dataset
from tests.data.conftest import data_cfg, png, write_rows

MERGE = 2  # the tiny model's spatial merge size


def check_example(ex, processor, n_images):
    """Image pad count == sum of image_grid_thw / merge^2; the token ids and grids the dataset computes
    without running the image processor equal the processor's on the decoded images."""
    assert ex.image_grid_thw.shape == (n_images, 3)
    pads = int((ex.input_ids == processor.image_token_id).sum())
    assert pads == int(ex.image_grid_thw.prod(-1).sum()) // MERGE ** 2
    images = ex.load_images()
    assert len(images) == n_images == ex.num_images
    if n_images:
        assert ex.prompt_text.count("<|image_pad|>") == n_images
        enc = processor(text=[ex.prompt_text], images=images, do_resize=False, return_tensors="pt")
        assert torch.equal(enc["image_grid_thw"], ex.image_grid_thw)
    else:
        enc = processor(text=[ex.prompt_text], return_tensors="pt")
    assert torch.equal(enc["input_ids"][0], ex.input_ids)


@pytest.mark.parametrize("suffix", [".parquet", ".json", ".jsonl"])
def test_loads_each_format_with_path_images(processor, tmp_path, suffix):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png(84, 56))
    rows = [{"problem": "<image>A path.", "answer": "1", "images": ["a.png"]},
            {"problem": "<image> and <image>?", "answer": "1", "images": ["a.png", "a.png"]},
            {"problem": "Text only.", "answer": "x", "images": []}]
    f = write_rows(tmp_path / f"train{suffix}", rows)
    ds = PromptDataset([f], data_cfg(image_dir=str(tmp_path / "imgs")), processor, max_prompt_length=512)
    assert len(ds) == len(rows) and not ds.skipped
    for i, row in enumerate(rows):
        ex = ds[i]
        assert ex.row_id == f"train:{i}" and ex.source == "train" and ex.answer == row["answer"]
        check_example(ex, processor, len(row["images"]))
    assert ds[0].image_grid_thw.tolist() == [[1, 4, 6]]  # 84x56 -> 4x6 patches -> 6 tokens
    assert (ds[0].input_ids == processor.image_token_id).sum() == 6
    assert ds[2].num_images == 0


def test_loads_parquet_struct_images(processor, tmp_path):
    """The Hugging Face Image feature layout of ViRL39K/Geo3K/MMK12: bytes, or a path when bytes is null."""
    (tmp_path / "a.png").write_bytes(png(84, 56))
    rows = [{"problem": "<image>How many?", "answer": "2", "images": [{"bytes": png(), "path": None}]},
            {"problem": "<image>Path in a struct.", "answer": "3", "images": [{"bytes": None, "path": "a.png"}]}]
    ds = PromptDataset([write_rows(tmp_path / "s.parquet", rows)], data_cfg(), processor, 512)
    assert len(ds) == 2
    check_example(ds[0], processor, 1)
    assert ds[1].image_grid_thw.tolist() == [[1, 4, 6]]


def test_raw_bytes_images_and_relative_paths_default_to_the_file_directory(processor, tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.png").write_bytes(png())
    raw = write_rows(tmp_path / "raw.parquet", [{"problem": "<image>q", "answer": "1", "images": [png()]}])
    rel = write_rows(sub / "rel.parquet", [{"problem": "<image>q", "answer": "1", "images": ["b.png"]}])
    ds = PromptDataset([raw, rel], data_cfg(), processor, 512)
    assert len(ds) == 2 and ds[1].load_images()[0].size == (56, 56) and ds.names == ["raw", "rel"]


def test_images_are_resized_into_the_pixel_bounds_once(processor, tmp_path):
    f = write_rows(tmp_path / "d.parquet", [{"problem": "<image>q", "answer": "1", "images": [png(300, 200)]}])
    ex = PromptDataset([f], data_cfg(max_pixels=112 * 112), processor, 512)[0]
    w, h = ex.load_images()[0].size
    assert w % 28 == 0 and h % 28 == 0 and w * h <= 112 * 112
    assert ex.image_grid_thw.tolist() == [[1, h // 14, w // 14]]


def test_custom_keys(processor, tmp_path):
    (tmp_path / "i.png").write_bytes(png())
    row = {"question": "<image>q", "solution": "7", "image": [str(tmp_path / "i.png")]}  # an absolute path
    f = write_rows(tmp_path / "d.jsonl", [row])
    ds = PromptDataset([f], data_cfg(prompt_key="question", answer_key="solution", image_key="image"), processor, 512)
    assert ds[0].answer == "7"


def test_missing_column_is_a_named_error(processor, tmp_path):
    f = write_rows(tmp_path / "nocol.parquet", [{"problem": "<image>q", "images": [png()]}])
    with pytest.raises(MissingColumnError, match=r"nocol\.parquet: missing column 'answer'"):
        PromptDataset([f], data_cfg(), processor, 512)


def test_bad_rows_are_skipped_counted_and_logged_with_their_row_id(processor, tmp_path, caplog):
    good = {"problem": "<image>ok", "answer": "1", "images": [png()]}
    rows = [
        good,
        {"problem": "<image>corrupt", "answer": "1", "images": [png()[:60]]},              # 1
        {"problem": "<image><image>two placeholders", "answer": "1", "images": [png()]},  # 2
        {"problem": "no placeholder", "answer": "1", "images": [png()]},                  # 3
        {"problem": "<image>list answer", "answer": ["1", "2"], "images": [png()]},       # 4
        {"problem": "<image>no answer", "answer": None, "images": [png()]},               # 5
        {"problem": "<image>" + "long " * 400, "answer": "1", "images": [png()]},         # 6
        {"problem": None, "answer": "1", "images": [png()]},                              # 7
        {"problem": "<image>a literal <|image_pad|>", "answer": "1", "images": [png()]},  # 8
        good,
    ]
    # Mixed answer types cannot share a parquet column: JSONL, images as files.
    for i, r in enumerate(rows):
        (tmp_path / f"{i}.png").write_bytes(r["images"][0])
    jrows = [{**r, "images": [f"{i}.png"] * len(r["images"])} for i, r in enumerate(rows)]
    f = write_rows(tmp_path / "bad.jsonl", jrows)
    with caplog.at_level(logging.WARNING, logger="megatron_vgpo.data"):
        ds = PromptDataset([f], data_cfg(), processor, max_prompt_length=256)
    assert len(ds) == 2 and [ds[i].row_id for i in range(2)] == ["bad:0", "bad:9"]
    assert {s.row_id: s.reason for s in ds.skipped} == {
        "bad:1": SKIP_IMAGE, "bad:2": SKIP_PLACEHOLDERS, "bad:3": SKIP_PLACEHOLDERS, "bad:4": SKIP_ANSWER,
        "bad:5": SKIP_ANSWER, "bad:6": SKIP_TOO_LONG, "bad:7": SKIP_PROBLEM, "bad:8": SKIP_PLACEHOLDERS}
    assert ds.skip_counts() == {SKIP_IMAGE: 1, SKIP_PLACEHOLDERS: 3, SKIP_ANSWER: 2, SKIP_TOO_LONG: 1, SKIP_PROBLEM: 1}
    for row_id in ("bad:1", "bad:2", "bad:3", "bad:4", "bad:5", "bad:6", "bad:7", "bad:8"):
        assert any(row_id in r.getMessage() for r in caplog.records), row_id
    assert any("skipped 8 of 10 rows" in r.getMessage() for r in caplog.records)


def test_prompt_length_limit_counts_image_tokens(processor, tmp_path):
    f = write_rows(tmp_path / "d.parquet", [{"problem": "<image>q", "answer": "1", "images": [png(112, 112)]}])
    n = len(PromptDataset([f], data_cfg(), processor, 512)[0].input_ids)  # 16 image tokens included
    assert len(PromptDataset([f], data_cfg(), processor, n)) == 1
    with pytest.raises(NoUsableExamplesError, match="prompt_too_long"):
        PromptDataset([f], data_cfg(), processor, n - 1)


@pytest.mark.parametrize("value,expected", [("B", "B"), (3, "3"), (3.0, "3"), (2.5, "2.5"), (-1, "-1"),
                                            (None, None), (True, None), (float("nan"), None), ("  ", None),
                                            ([1], None), ({"a": 1}, None)])
def test_answer_coercion(value, expected):
    assert coerce_answer(value) == expected


def test_numeric_answer_column_is_coerced(processor, tmp_path):
    f = write_rows(tmp_path / "d.parquet", [{"problem": "<image>q", "answer": 4, "images": [png()]}])
    assert PromptDataset([f], data_cfg(), processor, 512)[0].answer == "4"


def test_nothing_usable_is_a_named_error(processor, tmp_path):
    f = write_rows(tmp_path / "d.parquet", [{"problem": "<image>q", "answer": "1", "images": [b"junk"]}])
    with pytest.raises(NoUsableExamplesError, match=r"no usable rows in .*d\.parquet.*image_decode_error"):
        PromptDataset([f], data_cfg(), processor, 512)
    with pytest.raises(NoUsableExamplesError):
        PromptDataset([write_rows(tmp_path / "empty.jsonl", [])], data_cfg(), processor, 512)


def test_validation_set_reports_per_file_names(processor, tmp_path):
    for d in ("geo3k", "mmk12"):
        (tmp_path / d).mkdir()
        write_rows(tmp_path / d / "test.parquet", [{"problem": "<image>q", "answer": "1", "images": [png()]}] * 3)
    write_rows(tmp_path / "counting.parquet", [{"problem": "<image>q", "answer": "1", "images": [png()]}] * 2)
    files = [str(tmp_path / p) for p in ("geo3k/test.parquet", "mmk12/test.parquet", "counting.parquet")]
    val = build_val_dataset(data_cfg(val_files=files), processor, 512)
    assert val.names == ["geo3k/test", "mmk12/test", "counting"]
    assert val.kept_per_source == {"geo3k/test": 3, "mmk12/test": 3, "counting": 2}
    batches = list(iter_val_batches(val, 3))
    assert [len(b) for b in batches] == [3, 3, 2]
    assert [ex.source for b in batches for ex in b] == ["geo3k/test"] * 3 + ["mmk12/test"] * 3 + ["counting"] * 2
    assert [len(b) for b in iter_val_batches(val, -1)] == [8]
    assert build_val_dataset(data_cfg(), processor, 512) is None


def test_synthetic_dataset_loads_whole(processor, tmp_path):
    paths = write_synthetic_dataset(tmp_path, train=8, val=4, seed=0, opts=SyntheticOptions())
    ds = PromptDataset([str(paths["train"])], data_cfg(), processor, 512)
    assert len(ds) == 8 and not ds.skipped
    ex = ds[0]
    check_example(ex, processor, 1)
    assert ex.image_grid_thw.tolist() == [[1, 4, 4]] and ex.load_images()[0].size == (56, 56)


def test_bounds_outside_the_processors_are_flagged(processor, tmp_path, caplog):
    """The tiny processor resizes within [3136, 200704]: wider data bounds need the engine told."""
    f = write_rows(tmp_path / "d.parquet", [{"problem": "<image>q", "answer": "1", "images": [png()]}])
    with caplog.at_level(logging.WARNING, logger="megatron_vgpo.data"):
        PromptDataset([f], data_cfg(), processor, 512)
        assert "not within the processor's" not in caplog.text
        PromptDataset([f], data_cfg(max_pixels=1024 * 1024), processor, 4096)
    assert "processor_size_overrides" in caplog.text
