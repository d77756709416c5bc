"""Fixtures of the conversion tests (the tiny HF checkpoints and the torchrun launcher are in
``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_full_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL directory with tokenizer, processor and chat template (``make_tiny_qwen25vl``)."""
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, write_tiny_checkpoint

    options = TinyOptions(overrides={"text_config.num_hidden_layers": 2, "vision_config.depth": 2,
                                     "vision_config.fullatt_block_indexes": [1]})
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_full") / "hf", options)
