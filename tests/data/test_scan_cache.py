"""The dataset scan's cache: written once, read by later builds (the same rows, skips and logs),
invalidated by a changed file or setting, written atomically, and optional for read-only data."""

import copy
import logging
import os

import pytest

from megatron_vgpo.data import PromptDataset
from megatron_vgpo.data.dataset import SKIP_ANSWER, SKIP_IMAGE, SKIP_TOO_LONG
from megatron_vgpo.data.scan_cache import CONTENT_PROBE, file_fingerprint
from tests.data.conftest import data_cfg, png, write_rows

ROWS = [{"problem": "<image>one", "answer": "1", "images": [png(84, 56)]},
        {"problem": "<image>two", "answer": None, "images": [png()]},
        {"problem": "<image>three", "answer": "3", "images": [b"not an image"]},
        {"problem": "<image>four " + "word " * 200, "answer": "4", "images": [png()]},
        {"problem": "no image", "answer": "5", "images": []}]


@pytest.fixture
def scans(monkeypatch):
    """Counts the files actually scanned (not read from a cache)."""
    calls = []
    scan_file = PromptDataset._scan_file

    def counting(self, f):
        calls.append(self.files[f])
        return scan_file(self, f)

    monkeypatch.setattr(PromptDataset, "_scan_file", counting)
    return calls


def caches(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".scan.json"))


def state(ds):
    return ds._kept, ds.skipped, ds.kept_per_source, ds.skip_counts()


def test_written_once_then_read_with_the_same_rows_skips_and_logs(processor, tmp_path, scans, caplog):
    f = write_rows(tmp_path / "train.parquet", ROWS)
    with caplog.at_level(logging.WARNING, logger="megatron_vgpo.data"):
        first = PromptDataset([f], data_cfg(), processor, 200)
    logged, caplog.records[:] = [r.getMessage() for r in caplog.records], []
    assert scans == [f] and len(caches(tmp_path)) == 1
    assert first.skip_counts() == {SKIP_ANSWER: 1, SKIP_IMAGE: 1, SKIP_TOO_LONG: 1} and len(first) == 2
    with caplog.at_level(logging.WARNING, logger="megatron_vgpo.data"):
        second = PromptDataset([f], data_cfg(), processor, 200)
    assert scans == [f], "the second build scanned again"
    assert state(second) == state(first)
    assert [r.getMessage() for r in caplog.records] == logged
    assert [second[i].input_ids.tolist() for i in range(2)] == [first[i].input_ids.tolist() for i in range(2)]
    assert second[0].load_images()[0].size == (84, 56)


def test_another_name_reads_the_same_cache(processor, tmp_path, scans):
    """Row ids come from the dataset's names, not from the cache."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = write_rows(tmp_path / "a" / "test.parquet", ROWS), write_rows(tmp_path / "b" / "test.parquet", ROWS)
    PromptDataset([a], data_cfg(), processor, 200)
    both = PromptDataset([a, b], data_cfg(), processor, 200)
    assert scans == [a, b] and both.names == ["a/test", "b/test"]
    assert [both[i].row_id for i in range(len(both))] == ["a/test:0", "a/test:4", "b/test:0", "b/test:4"]


@pytest.mark.parametrize("change", ["max_prompt_length", "min_pixels", "max_pixels", "prompt_key", "image_dir",
                                    "template", "chat_template"])
def test_a_changed_setting_scans_again(processor, tmp_path, scans, change):
    rows = [{**r, "question": r["problem"]} for r in ROWS]
    f = write_rows(tmp_path / "train.parquet", rows)
    PromptDataset([f], data_cfg(), processor, 200)
    cfg, length, template, proc = data_cfg(), 200, "{problem}", processor
    if change == "max_prompt_length":
        length = 1024
    elif change in ("min_pixels", "max_pixels"):
        cfg = data_cfg(**{change: 56 * 28 if change == "min_pixels" else 140 * 140})
    elif change == "prompt_key":
        cfg = data_cfg(prompt_key="question")
    elif change == "image_dir":
        cfg = data_cfg(image_dir=str(tmp_path / "images"))
    elif change == "chat_template":
        proc = copy.deepcopy(processor)
        proc.chat_template = proc.chat_template.replace("You are", "You're")
    if change != "template":
        template = PromptDataset([f], cfg, proc, length).template
    PromptDataset([f], cfg, proc, length, template=template)
    assert scans == [f, f] and len(caches(tmp_path)) == 2
    PromptDataset([f], data_cfg(), processor, 200)  # the first settings' cache is still there
    assert len(scans) == 2


def test_a_changed_file_scans_again(processor, tmp_path, scans):
    f = write_rows(tmp_path / "train.parquet", ROWS)
    first = PromptDataset([f], data_cfg(), processor, 200)
    write_rows(f, ROWS[:1] + [{"problem": "<image>two", "answer": "2", "images": [png()]}] + ROWS[2:])
    second = PromptDataset([f], data_cfg(), processor, 200)
    assert scans == [f, f] and len(second) == len(first) + 1
    stat = os.stat(f)
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # touched: the mtime is in the key
    PromptDataset([f], data_cfg(), processor, 200)
    assert len(scans) == 3


def test_content_key_reads_only_the_ends_of_a_big_file(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(bytes(3 * CONTENT_PROBE))
    base = file_fingerprint(path)

    def changed_at(offset: int) -> dict:
        stat = os.stat(path)
        with open(path, "r+b") as fh:
            fh.seek(offset)
            old = fh.read(1)
            fh.seek(offset)
            fh.write(b"\x01")
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and mtime: only content differs
        fingerprint = file_fingerprint(path)
        with open(path, "r+b") as fh:
            fh.seek(offset)
            fh.write(old)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        return fingerprint

    assert changed_at(10) != base and changed_at(3 * CONTENT_PROBE - 1) != base
    assert changed_at(CONTENT_PROBE + 7) == base  # the documented blind spot: same size, mtime and ends


def test_cache_dir_for_read_only_data(processor, tmp_path, scans, caplog, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    f = write_rows(data / "train.parquet", ROWS)
    cache_dir = tmp_path / "cache"
    PromptDataset([f], data_cfg(scan_cache_dir=str(cache_dir)), processor, 200)
    PromptDataset([f], data_cfg(scan_cache_dir=str(cache_dir)), processor, 200)
    assert len(scans) == 1 and len(caches(cache_dir)) == 1 and not caches(data)

    def read_only(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr("megatron_vgpo.data.scan_cache.os.replace", read_only)
    with caplog.at_level(logging.WARNING, logger="megatron_vgpo.data"):
        ds = PromptDataset([f], data_cfg(), processor, 200)  # beside the data: not writable
    assert len(ds) == 2 and len(scans) == 2
    assert "cannot write the scan cache" in caplog.text and "data.scan_cache_dir" in caplog.text
    assert sorted(p.name for p in data.iterdir()) == ["train.parquet"]  # no temporary file left


def test_writes_are_atomic_and_a_damaged_cache_is_rescanned(processor, tmp_path, scans, caplog):
    f = write_rows(tmp_path / "train.parquet", ROWS)
    PromptDataset([f], data_cfg(), processor, 200)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    (cache,) = caches(tmp_path)
    (tmp_path / cache).write_text('{"key": "trunc')
    with caplog.at_level(logging.WARNING, logger="megatron_vgpo.data"):
        again = PromptDataset([f], data_cfg(), processor, 200)
    assert "unreadable scan cache" in caplog.text and len(scans) == 2 and len(again) == 2
    PromptDataset([f], data_cfg(), processor, 200)  # rewritten whole
    assert len(scans) == 2


def test_scan_cache_off(processor, tmp_path, scans):
    f = write_rows(tmp_path / "train.parquet", ROWS)
    for _ in range(2):
        PromptDataset([f], data_cfg(scan_cache=False), processor, 200)
    assert len(scans) == 2 and not caches(tmp_path)
