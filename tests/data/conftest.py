"""Fixtures for the data tests: the tiny checkpoint's processor and small data files."""

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from megatron_vgpo.config.schema import DataConfig


@pytest.fixture(scope="session")
def processor(tmp_path_factory):
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor, write_tiny_checkpoint

    return load_processor(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt"))


def png(width=56, height=56, color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def data_cfg(**kw) -> DataConfig:
    """Small pixel bounds so the 56x56 test images stay 56x56 (4 image tokens)."""
    return DataConfig(**{"min_pixels": 56 * 56, "max_pixels": 112 * 112, **kw})


def write_rows(path, rows):
    """Rows as parquet (images as {bytes, path} structs when they are dicts), json or jsonl."""
    path = str(path)
    if path.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.endswith(".jsonl"):
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        with open(path, "w") as f:
            json.dump(rows, f)
    return path
