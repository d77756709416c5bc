"""Tests for the tiny Qwen2.5-VL checkpoint writer (``tools/make_tiny_qwen25vl.py`` and
``megatron_vgpo.models.qwen2_5_vl.tiny``).

The reference checkpoint is built twice by the CLI in two separate processes (in parallel, with
different hash seeds and tokenizers threading), so the byte-for-byte check also covers anything that
could vary between processes. The other variants are built in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from megatron_vgpo.models.qwen2_5_vl.tiny import (
    CHAT_TEMPLATE, PRETOKENIZE_REGEX, SPECIAL_TOKENS, TinyOptions, load_processor, parse_overrides,
    write_tiny_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "make_tiny_qwen25vl.py"
BPE_SIZE = 1003  # the documented default: special token i has id 1003 + i, len(tokenizer) = 1025


def _run_tool(*args: str, **env_vars: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env_vars)
    return subprocess.Popen([sys.executable, str(TOOL), *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _digests(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir())}


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    # b differs in what could leak into the files: Python's hash seed and the BPE trainer's threading.
    procs = {"a": _run_tool("--output", str(root / "a"), "--seed", "0"),
             "b": _run_tool("--output", str(root / "b"), "--seed", "0",
                            PYTHONHASHSEED="12345", TOKENIZERS_PARALLELISM="false")}
    results = {name: _finish(p) for name, p in procs.items()}
    for name, r in results.items():
        assert r.returncode == 0, f"build {name} failed:\n{r.stderr}"
    return {"a": root / "a", "b": root / "b", "root": root}


def test_reproducible_across_processes(builds):
    a, b = _digests(builds["a"]), _digests(builds["b"])
    assert a == b
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
            "preprocessor_config.json", "chat_template.json"} <= set(a)
    assert not [p for p in builds["root"].iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_another_seed_changes_every_weight_but_not_the_tokenizer(builds, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "seed1", TinyOptions(seed=1))
    a, c = _tensors(builds["a"]), _tensors(other)
    assert a.keys() == c.keys()
    assert all(not torch.equal(a[k], c[k]) for k in a)
    da, dc = _digests(builds["a"]), _digests(other)
    assert da["tokenizer.json"] == dc["tokenizer.json"] and da["config.json"] == dc["config.json"]


def test_default_config_and_weights(builds):
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = json.loads((builds["a"] / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (text["vocab_size"], text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"],
            text["num_attention_heads"], text["num_key_value_heads"]) == (1025, 128, 256, 4, 4, 2)
    assert text["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]}
    assert text["rms_norm_eps"] == 1e-6 and text["max_position_embeddings"] == 4096
    assert cfg["tie_word_embeddings"] is False
    assert (vision["depth"], vision["hidden_size"], vision["intermediate_size"], vision["num_heads"],
            vision["patch_size"], vision["temporal_patch_size"], vision["spatial_merge_size"],
            vision["window_size"], vision["fullatt_block_indexes"], vision["out_hidden_size"]) == (
        4, 64, 128, 2, 14, 2, 2, 112, [1, 3], 128)

    tensors = _tensors(builds["a"])
    assert "lm_head.weight" in tensors and "visual.merger.mlp.0.bias" in tensors  # the Hub's names
    assert all(t.dtype == torch.float32 for t in tensors.values())
    # Norms and biases are random too, so a conversion that mixes them up is caught.
    assert not torch.equal(tensors["model.norm.weight"], torch.ones(128))
    assert tensors["model.layers.0.self_attn.q_proj.bias"].abs().min() > 0

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(builds["a"])
    assert torch.equal(model.model.language_model.layers[3].mlp.up_proj.weight,
                       tensors["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(model.model.visual.blocks[0].attn.qkv.bias, tensors["visual.blocks.0.attn.qkv.bias"])
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)


def test_tokenizer_ids_and_round_trip(builds):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as HF_REGEX

    assert PRETOKENIZE_REGEX == HF_REGEX
    tok = AutoTokenizer.from_pretrained(builds["a"])
    assert len(tok) == BPE_SIZE + 22
    for i, (token, _) in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(token) == BPE_SIZE + i, token
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)

    cfg = json.loads((builds["a"] / "config.json").read_text())
    gen = json.loads((builds["a"] / "generation_config.json").read_text())
    ids = {t: BPE_SIZE + i for i, (t, _) in enumerate(SPECIAL_TOKENS)}
    assert (cfg["image_token_id"], cfg["video_token_id"], cfg["vision_start_token_id"],
            cfg["vision_end_token_id"]) == (ids["<|image_pad|>"], ids["<|video_pad|>"],
                                            ids["<|vision_start|>"], ids["<|vision_end|>"])
    assert (cfg["text_config"]["bos_token_id"], cfg["text_config"]["eos_token_id"]) == (
        ids["<|endoftext|>"], ids["<|im_end|>"])
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]

    raw = Tokenizer.from_file(str(builds["a"] / "tokenizer.json"))
    text = ("<think> 2x + 3 = 11, so x = 4. </think> The answer is \\boxed{4}.\n\n"
            "Ünïcödé, 中文, emoji 🙂 and tabs\tand   spaces 0123456789<|im_end|>")
    ids_hf = tok(text).input_ids
    assert ids_hf == raw.encode(text).ids
    assert tok.decode(ids_hf) == text
    assert ids_hf[-1] == ids["<|im_end|>"] and all(i < len(tok) for i in ids_hf)
    # <tool_call> and the FIM tokens are added but not "special" in the real tokenizer either.
    skipped = tok.decode(tok("<|vision_start|>hi<tool_call>").input_ids, skip_special_tokens=True)
    assert skipped == "hi<tool_call>"


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)),  # -> 112 x 140
            Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8))]


def test_chat_template_processor_and_forward(builds):
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = load_processor(builds["a"])
    assert processor.chat_template == CHAT_TEMPLATE
    assert processor.tokenizer.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "image"}, {"type": "text", "text": "Find x. Put it in \\boxed{}."}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                      "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
                      "Find x. Put it in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    batch = processor(text=[prompt], images=_images(), return_tensors="pt")
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 8, 10], [1, 4, 4]]
    image_pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (batch["input_ids"] == image_pad).sum().item() == int(grid.prod(-1).sum()) // 4 == 24
    assert batch["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(builds["a"]).eval()
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 1025)
    assert torch.isfinite(logits).all()
    logprobs = logits.log_softmax(-1)
    assert logprobs.std(-1).min() > 1e-3  # not uniform: the random weights make a real distribution


@pytest.mark.skipif(not __import__("importlib").util.find_spec("torchvision"),
                    reason="transformers 5.19's AutoProcessor always builds Qwen2.5-VL's torchvision video "
                           "processor (huggingface/transformers#48558); load_processor covers the CPU case")
def test_auto_processor_with_torchvision(builds):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(builds["a"])
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert processor.image_processor.merge_size == 2


def test_tie_embeddings_bf16_and_shards(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = write_tiny_checkpoint(tmp_path / "tied", TinyOptions(tie_embeddings=True, dtype="bfloat16",
                                                               max_shard_size="1MB"))
    assert (out / "model.safetensors.index.json").exists()
    tensors = _tensors(out)
    assert "lm_head.weight" not in tensors and all(t.dtype == torch.bfloat16 for t in tensors.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["dtype"] == "bfloat16"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, tensors["model.embed_tokens.weight"])


def test_set_overrides_land_in_config(tmp_path):
    overrides = parse_overrides([
        "text_config.num_hidden_layers=2", "vision_config.depth=2", "vision_config.fullatt_block_indexes=[1]",
        "text_config.vocab_size=1100", "text_config.rope_parameters.rope_theta=1e4",
        "text_config.hidden_size=256", "text_config.intermediate_size=512"])
    out = write_tiny_checkpoint(tmp_path / "set", TinyOptions(overrides=overrides))
    cfg = json.loads((out / "config.json").read_text())
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (text["num_hidden_layers"], text["vocab_size"], text["hidden_size"]) == (2, 1100, 256)
    assert text["rope_parameters"]["rope_theta"] == 1e4
    assert text["rope_parameters"]["mrope_section"] == [8, 12, 12]  # derived from head_dim 64
    assert (vision["depth"], vision["fullatt_block_indexes"], vision["out_hidden_size"]) == (2, [1], 256)
    tensors = _tensors(out)
    assert tensors["model.embed_tokens.weight"].shape == (1100, 256)
    assert not any(k.startswith("model.layers.2.") or k.startswith("visual.blocks.2.") for k in tensors)


@pytest.mark.parametrize("override, message", [
    ("text_config.num_hiden_layers=2", "did you mean 'num_hidden_layers'"),
    ("text_config.num_attention_heads=8", "head_dim"),
    ("text_config.rope_parameters.mrope_section=[4,4,4]", "must sum to"),
    ("text_config.vocab_size=100", "smaller than the tokenizer"),
    ("vision_config.fullatt_block_indexes=[7]", "fullatt_block_indexes"),
])
def test_bad_overrides_are_refused(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        write_tiny_checkpoint(tmp_path / "bad", TinyOptions(overrides=parse_overrides([override])))
    assert not (tmp_path / "bad").exists() and not list(tmp_path.iterdir())


def test_refuses_non_empty_output_unless_forced(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    refused = _finish(_run_tool("--output", str(out)))
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    write_tiny_checkpoint(out, TinyOptions(overrides={"text_config.num_hidden_layers": 2}), force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directories left
