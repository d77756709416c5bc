"""The tiny random Qwen2.5-VL checkpoint shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("e2e_model") / "tiny", TinyOptions(seed=0))
