"""A tiny random Qwen2.5-VL checkpoint, built offline and byte-for-byte reproducible per seed.

Tests, CPU runs and the conversion/parity tools need a real Hugging Face Qwen2.5-VL directory
(weights, config, tokenizer, processor, chat template) that loads with ``from_pretrained`` and vLLM,
yet is small enough for a 2-core CPU and needs no network. This module writes one; the CLI is
``tools/make_tiny_qwen25vl.py``.

What is faithful to the real models, and what is not:

- Architecture: the real ``Qwen2_5_VLForConditionalGeneration`` (M-RoPE, GQA, QKV bias, SwiGLU,
  window + full attention vision blocks, 2x2 patch merger), only narrow and shallow. The language
  model's head_dim is ``hidden_size / num_attention_heads`` (transformers has no separate head_dim
  key for Qwen2.5-VL) and must stay >= 32: vLLM's CPU attention supports 32, 64, 80, 96, ...
- Weights: every tensor, norms and biases included, is drawn at random (norm weights around 1), so a
  conversion that swaps, drops or mis-slices any tensor changes the outputs. Each tensor has its own
  generator, seeded from ``(seed, parameter name)``; changing one size leaves other tensors alone.
- Tokenizer: a byte-level BPE trained with ``tokenizers`` on the fixed corpus below (math and
  reasoning text), with Qwen2's pre-tokenizer regex, NFC normalizer and byte-level decoder, followed
  by the 22 Qwen2.5 special tokens in their real order (the real ids minus 151643 + the BPE size).
  ``vocab_size`` is exactly ``len(tokenizer)`` (1025 by default: divisible by neither 2, 4 nor 8, so
  Megatron's TP vocabulary padding is exercised). Real models pad it (151665 tokens, 152064 rows);
  ``--set text_config.vocab_size=N`` reproduces that.
- Files: the Hub layout of Qwen/Qwen2.5-VL-*-Instruct (tokenizer.json, tokenizer_config.json with
  the real chat template, vocab.json, merges.txt, special_tokens_map.json, preprocessor_config.json,
  chat_template.json), with HF 5.x ``config.json`` (nested ``text_config``) and safetensors written
  by ``save_pretrained``, whose tensor names are the Hub's (``model.layers.N.*``, ``visual.*``,
  ``lm_head.weight``), not the runtime module names (``model.language_model.layers.N.*``,
  ``model.visual.*``). ``generation_config.json`` holds only token ids: the real one also sets
  temperature 0.1 / top_k 1, which vLLM would apply by default.

Reproducibility: tensors come from per-tensor CPU generators; every JSON file is written with sorted
keys; safetensors carry only ``{"format": "pt"}`` metadata; the BPE trainer is deterministic across
processes (checked by the tests, which build in two separate processes). Files embed the transformers
version (``transformers_version``), so builds are identical for a given transformers/tokenizers pair.

transformers 5.19 cannot build ``Qwen2_5_VLProcessor`` without torchvision (its video processor
requires it, and ``AutoProcessor`` always loads one: huggingface/transformers#48558); use
``load_processor`` below, which falls back to an image-only processor in that case.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

__all__ = [
    "SPECIAL_TOKENS", "CHAT_TEMPLATE", "TinyOptions", "build_tokenizer", "build_config",
    "parse_overrides", "write_tiny_checkpoint", "load_processor",
]

# The 22 Qwen2.5 added tokens in their real order (ids 151643..151664 in the real vocabulary) and
# whether each is "special" (skipped by decode(skip_special_tokens=True)), as in the real files.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)

# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation runs, newlines.
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# The chat template of Qwen/Qwen2.5-VL-*-Instruct (chat_template.json and tokenizer_config.json).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# CLIP normalisation, as in the real preprocessor_config.json.
_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# Fixed BPE training corpus: geometry/algebra problems and <think> ... \boxed{} reasoning, the kind
# of text the RL runs produce. Changing it changes every tokenizer built from it.
_CORPUS = (
    "You are a helpful assistant. Solve the problem step by step and put the final answer in \\boxed{}.",
    "<think> Let me think about this problem carefully. First, read the figure. </think>",
    "<think> The triangle ABC is a right triangle with the right angle at C, so AB is the hypotenuse. "
    "By the Pythagorean theorem, AB^2 = AC^2 + BC^2 = 3^2 + 4^2 = 9 + 16 = 25, so AB = 5. </think> "
    "The answer is \\boxed{5}.",
    "In the figure, the circle has center O and radius 6. The chord AB subtends an angle of 60 degrees "
    "at the center, so the length of the chord equals the radius: AB = 6.",
    "The area of a circle is \\pi r^2 and its circumference is 2 \\pi r. With r = 3, the area is 9\\pi.",
    "Find the value of x such that 2x + 7 = 19. Subtracting 7 from both sides gives 2x = 12, hence x = 6.",
    "Question: What is the perimeter of the rectangle shown in the image? The width is 8 cm and the "
    "height is 5 cm, so the perimeter is 2(8 + 5) = 26 cm. Answer: \\boxed{26}",
    "Since the lines are parallel, the alternate interior angles are equal, and therefore angle 1 "
    "equals angle 2, which measures 45 degrees.",
    "Wait, let me double check the computation. 12 times 12 is 144, and the square root of 144 is 12. "
    "So the side length is 12 and the area is 144 square units.",
    "Let f(x) = x^2 - 4x + 3. The roots are x = 1 and x = 3, and the vertex is at x = 2 where f(2) = -1.",
    "The probability of drawing a red ball is 3/8, so the probability of not drawing a red ball is 5/8.",
    "We compute the mean of the data: (4 + 8 + 15 + 16 + 23 + 42) / 6 = 108 / 6 = 18.",
    "The slope of the line through (1, 2) and (3, 8) is (8 - 2) / (3 - 1) = 3, so y = 3x - 1.",
    "Therefore, the volume of the cylinder is V = \\pi r^2 h = \\pi \\cdot 2^2 \\cdot 5 = 20\\pi.",
    "Looking at the bar chart, the tallest bar corresponds to Thursday, with a value of 37 visitors.",
    "Hmm, that does not match any of the choices. Let me reconsider: the angle is exterior, not interior.",
    "Choices: (A) 30 (B) 45 (C) 60 (D) 90. The correct option is (C), so the answer is \\boxed{C}.",
    "The sum of the interior angles of a polygon with n sides is (n - 2) \\times 180 degrees. For a "
    "hexagon, n = 6, so the sum is 720 degrees and each angle of a regular hexagon is 120 degrees.",
    "If the ratio of the sides of two similar triangles is 2:3, the ratio of their areas is 4:9.",
    "Using the law of cosines, c^2 = a^2 + b^2 - 2ab \\cos C. With a = 7, b = 8 and C = 60 degrees, "
    "c^2 = 49 + 64 - 56 = 57, so c = \\sqrt{57}.",
    "The function is increasing on the interval where its derivative is positive: f'(x) = 3x^2 - 12 > 0, "
    "that is, when x < -2 or x > 2.",
    "Step 1: identify the given quantities. Step 2: write the equation. Step 3: solve for the unknown. "
    "Step 4: check the result against the figure.",
    "The image shows a square inscribed in a circle. The diagonal of the square equals the diameter of "
    "the circle, which is 10, so the side is 10 / \\sqrt{2} = 5\\sqrt{2} and the area is 50.",
    "\\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}, and \\frac{5}{6} \\times 12 = 10.",
    "Let the number of apples be a and the number of oranges be b. Then a + b = 20 and a - b = 4, so "
    "a = 12 and b = 8.",
    "The graph crosses the x-axis at two points, which means the quadratic has two distinct real roots "
    "and its discriminant is positive.",
    "Observe that every term is divisible by 3; dividing through gives x + 2y = 5.",
    "I think the answer is 42, but let me verify: 6 \\times 7 = 42. Yes, the final answer is \\boxed{42}.",
    "The tangent to a circle is perpendicular to the radius at the point of contact, so angle OTA is 90.",
    "In triangle DEF, DE = DF, so the triangle is isosceles and the base angles E and F are equal.",
    "Converting units: 1 meter is 100 centimeters, so 3.5 meters is 350 centimeters.",
    "The table lists the population of four cities; the difference between the largest and the smallest "
    "is 1,250,000 - 480,000 = 770,000.",
    "Because the opposite sides of a parallelogram are equal and parallel, the quadrilateral ABCD is a "
    "parallelogram, and its diagonals bisect each other.",
    "The speed is distance divided by time: 150 km / 2.5 h = 60 km/h.",
    "Answer the question using a single word or phrase. What color is the largest shape? Blue.",
    "Is the statement true or false? The statement is false because 0.1 + 0.2 is not exactly 0.3 in "
    "floating point arithmetic, although it is in exact arithmetic.",
    "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end.",
    "The median of 3, 9, 1, 7, 5 is found by sorting: 1, 3, 5, 7, 9, so the median is 5.",
    "An angle bisector divides the opposite side in the ratio of the adjacent sides: BD / DC = AB / AC.",
    "The coordinates of the midpoint of (2, -4) and (8, 10) are (5, 3).",
    "Consider the sequence 2, 5, 8, 11, ... It is arithmetic with common difference 3, so the 20th term "
    "is 2 + 19 \\times 3 = 59 and the sum of the first 20 terms is 20(2 + 59) / 2 = 610.",
    "A geometric sequence with first term 3 and ratio 2 has terms 3, 6, 12, 24, 48; the nth term is "
    "3 \\cdot 2^{n-1}.",
    "Given sin(theta) = 3/5 with theta in the first quadrant, cos(theta) = 4/5 and tan(theta) = 3/4.",
    "The pie chart shows that 25% of students prefer football, 40% basketball and the rest swimming, "
    "which is 35%. With 200 students, 70 prefer swimming.",
    "Two dice are rolled. There are 36 equally likely outcomes, and 6 of them give a sum of seven, so "
    "the probability is 1/6.",
    "The cube has edge length 4, so its surface area is 6 \\times 16 = 96 and its volume is 64.",
    "Let me re-examine the diagram: points P, Q and R are collinear, and M is the midpoint of QR.",
    "According to the scale on the map, 1 cm represents 5 km; the distance on the map is 7.2 cm, so the "
    "actual distance is 36 km.",
    "Solving the system of inequalities x >= 0, y >= 0, x + y <= 10 gives a triangular feasible region "
    "whose vertices are (0, 0), (10, 0) and (0, 10).",
    "The reflection of the point (3, -2) across the y-axis is (-3, -2); across the x-axis it is (3, 2).",
    "Because the exponent is negative, 2^{-3} = 1/8 = 0.125; likewise log_2(32) = 5 and log_10(1000) = 3.",
    "By symmetry, the shaded region is exactly half of the square, so its area is 18 when the square "
    "has side 6.",
    "Final check: the units are consistent, the number is positive and it lies between the estimates, "
    "so I am confident. **Final Answer** \\boxed{18}",
)


@dataclass(frozen=True)
class TinyOptions:
    """How to build the tiny checkpoint (the model config itself is set with ``overrides``)."""

    seed: int = 0
    """Seed of the random weights; the tokenizer does not depend on it."""
    dtype: str = "float32"
    """Weight dtype: float32 or bfloat16."""
    tie_embeddings: bool = False
    """Tie lm_head to the input embeddings (Qwen2.5-VL-3B style); untied is the 7B/32B/72B style."""
    init_std: float = 0.02
    """Standard deviation of the weights; norm weights are 1 + init_std * N(0, 1)."""
    bpe_vocab_size: int = 1003
    """Size of the BPE vocabulary (256 bytes + merges); the special tokens come after it."""
    min_pixels: int = 56 * 56
    """Image processor lower bound on pixels per image (the real value)."""
    max_pixels: int = 256 * 28 * 28
    """Image processor upper bound on pixels per image (real: 12845056); small for CPU."""
    max_shard_size: str | None = None
    """Shard the safetensors (e.g. "200KB", with an index file, like real checkpoints); one file if None."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted config keys to override, e.g. {"text_config.num_hidden_layers": 2} (see parse_overrides)."""


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(bpe_vocab_size: int = TinyOptions.bpe_vocab_size):
    """Train the byte-level BPE on the fixed corpus and append the 22 Qwen2.5 special tokens.

    Returns a ``tokenizers.Tokenizer`` with the pipeline of Qwen2's tokenizer.json.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    byte_level = dict(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok = Tokenizer(models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(**byte_level),
    ])
    tok.post_processor = processors.ByteLevel(**byte_level)
    tok.decoder = decoders.ByteLevel(**byte_level)
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab_size, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    if tok.get_vocab_size() != bpe_vocab_size:
        raise ValueError(f"the built-in corpus yields only {tok.get_vocab_size()} BPE tokens, "
                         f"fewer than bpe_vocab_size={bpe_vocab_size}")
    tok.add_special_tokens([AddedToken(t, special=s, normalized=False) for t, s in SPECIAL_TOKENS])
    return tok


def _token_ids(tok) -> dict[str, int]:
    return {t: tok.token_to_id(t) for t, _ in SPECIAL_TOKENS}


# ----------------------------------------------------------------------------------------------------
# Config


def default_config_dict(tok) -> dict[str, Any]:
    """The tiny Qwen2.5-VL config (HF 5.x layout) for tokenizer ``tok``, before overrides."""
    ids = _token_ids(tok)
    text = dict(
        vocab_size=tok.get_vocab_size(), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=4096,
        rms_norm_eps=1e-6, initializer_range=0.02, use_cache=True, use_sliding_window=False,
        sliding_window=None, max_window_layers=4, attention_dropout=0.0,
        # head_dim 32 -> 16 rotary frequencies split over (t, h, w) like the real [16, 24, 24] of 64.
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        # No pad_token_id: HF would make it the embedding's padding_idx (zero row, no gradient),
        # which the real models do not have.
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=None,
    )
    vision = dict(
        depth=4, hidden_size=64, intermediate_size=128, num_heads=2, hidden_act="silu", in_channels=3,
        patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
        fullatt_block_indexes=[1, 3], out_hidden_size=128, tokens_per_second=2, initializer_range=0.02,
    )
    return dict(
        architectures=["Qwen2_5_VLForConditionalGeneration"], model_type="qwen2_5_vl",
        text_config=text, vision_config=vision, tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )


def _parse_value(raw: str) -> Any:
    # JSON first so that 1e6 is a float (YAML 1.1 reads it as a string); YAML for true/null/bare words.
    try:
        return json.loads(raw)
    except ValueError:
        return yaml.safe_load(raw)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["text_config.num_hidden_layers=2", ...]`` -> ``{"text_config.num_hidden_layers": 2}``."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        out[key.strip()] = _parse_value(raw.strip())
    return out


def _known_keys(config_dict: dict) -> dict[str, set[str]]:
    """Keys each (sub)config accepts: the defaults here plus every field of the HF config classes."""
    from transformers import Qwen2_5_VLConfig

    full = Qwen2_5_VLConfig(text_config=config_dict["text_config"],
                            vision_config=config_dict["vision_config"]).to_dict()
    return {
        "": set(full) | set(config_dict),
        "text_config": set(full["text_config"]) | set(config_dict["text_config"]),
        "vision_config": set(full["vision_config"]) | set(config_dict["vision_config"]),
        "text_config.rope_parameters": {"rope_type", "rope_theta", "mrope_section"},
        "vision_config.rope_parameters": {"rope_type", "rope_theta"},
    }


def _apply_overrides(config_dict: dict, overrides: dict[str, Any]) -> dict:
    known = _known_keys(config_dict)
    out = copy.deepcopy(config_dict)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        section = ".".join(parents)
        if section not in known:
            raise ValueError(f"override '{dotted}': no config section '{section}'; "
                             f"sections are {sorted(s for s in known if s)} and the top level")
        if leaf not in known[section]:
            close = difflib.get_close_matches(leaf, sorted(known[section]), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"override '{dotted}': unknown key '{leaf}' in "
                             f"{section or 'the top level'}{hint}")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _derive_and_check(cfg: dict, explicit: set[str], num_tokens: int) -> None:
    """Keep dependent sizes consistent after overrides, and refuse inconsistent ones."""
    text, vision = cfg["text_config"], cfg["vision_config"]
    heads, kv = text["num_attention_heads"], text["num_key_value_heads"]
    if text["hidden_size"] % heads:
        raise ValueError(f"text_config.hidden_size={text['hidden_size']} is not divisible by "
                         f"num_attention_heads={heads}")
    head_dim = text["hidden_size"] // heads
    if head_dim < 32 or head_dim % 2:
        raise ValueError(f"text head_dim = hidden_size / num_attention_heads = {head_dim}; it must be even "
                         f"and >= 32 (vLLM's CPU attention supports head sizes 32, 64, 80, 96, ...)")
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
    rope = text["rope_parameters"]
    if not explicit & {"text_config.rope_parameters", "text_config.rope_parameters.mrope_section"}:
        half = head_dim // 2  # the real split [16, 24, 24] of 64 frequencies, scaled
        t = half // 4
        rope["mrope_section"] = [t, (half - t) // 2, half - t - (half - t) // 2]
    if sum(rope["mrope_section"]) != head_dim // 2:
        raise ValueError(f"mrope_section {rope['mrope_section']} must sum to head_dim / 2 = {head_dim // 2}")
    if "text_config.max_window_layers" not in explicit:
        text["max_window_layers"] = text["num_hidden_layers"]
    if "vision_config.out_hidden_size" not in explicit:
        vision["out_hidden_size"] = text["hidden_size"]
    if vision["out_hidden_size"] != text["hidden_size"]:
        raise ValueError("vision_config.out_hidden_size must equal text_config.hidden_size")
    if vision["hidden_size"] % vision["num_heads"] or (vision["hidden_size"] // vision["num_heads"]) % 4:
        raise ValueError("vision head_dim (hidden_size / num_heads) must be a multiple of 4 (2-D rotary)")
    if any(not 0 <= i < vision["depth"] for i in vision["fullatt_block_indexes"]):
        raise ValueError(f"vision_config.fullatt_block_indexes {vision['fullatt_block_indexes']} must lie "
                         f"in [0, depth={vision['depth']})")
    if text["vocab_size"] < num_tokens:
        raise ValueError(f"text_config.vocab_size={text['vocab_size']} is smaller than the tokenizer "
                         f"({num_tokens} tokens)")


def build_config(tok, options: TinyOptions):
    """The ``Qwen2_5_VLConfig`` for tokenizer ``tok``: defaults, then --tie-embeddings, then overrides."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import Qwen2_5_VLConfig

    cfg = default_config_dict(tok)
    cfg["tie_word_embeddings"] = options.tie_embeddings
    cfg = _apply_overrides(cfg, options.overrides)
    cfg.pop("architectures"), cfg.pop("model_type")
    try:  # HF's strict dataclasses check the value types before the sizes are compared below
        Qwen2_5_VLConfig(**copy.deepcopy(cfg))
    except StrictDataclassError as e:
        raise ValueError(f"invalid config value: {e}") from None
    _derive_and_check(cfg, set(options.overrides), tok.get_vocab_size())
    config = Qwen2_5_VLConfig(**cfg)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


# ----------------------------------------------------------------------------------------------------
# Weights


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def init_weights(model: torch.nn.Module, seed: int, std: float) -> None:
    """Overwrite every parameter with N(0, std^2) (norm weights: 1 + N(0, std^2)), one generator each."""
    for name, param in model.named_parameters():
        gen = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, name))
        values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * std
        is_norm = param.dim() == 1 and ("norm" in name or "ln_q" in name) and name.endswith("weight")
        param.copy_(values + 1.0 if is_norm else values)


def build_model(config, options: TinyOptions):
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.random.fork_rng(devices=[]):  # HF's own init draws from (and would advance) the global RNG
        model = Qwen2_5_VLForConditionalGeneration(config).eval()
    init_weights(model, options.seed, options.init_std)
    if options.tie_embeddings or config.tie_word_embeddings:
        model.tie_weights()
    return model.to(getattr(torch, options.dtype))


# ----------------------------------------------------------------------------------------------------
# Files


def _write_json(path: Path, obj: Any, compact: bool = False) -> None:
    text = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) if compact
            else json.dumps(obj, ensure_ascii=False, indent=2, sort_keys=True) + "\n")
    path.write_text(text, encoding="utf-8")


def _added_token(content: str) -> dict:
    return dict(content=content, lstrip=False, normalized=False, rstrip=False, single_word=False)


def write_tokenizer_files(tok, out: Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, special_tokens_map.json."""
    tok.save(str(out / "tokenizer.json"), pretty=True)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    _write_json(out / "vocab.json", vocab, compact=True)
    merges = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (out / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    ids = _token_ids(tok)
    additional = [t for t, s in SPECIAL_TOKENS[1:] if s]  # the real list: <|im_start|> .. <|video_pad|>
    _write_json(out / "tokenizer_config.json", dict(
        add_bos_token=False, add_prefix_space=False,
        added_tokens_decoder={str(ids[t]): dict(_added_token(t), special=s) for t, s in SPECIAL_TOKENS},
        additional_special_tokens=additional, bos_token=None, chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, eos_token="<|im_end|>", errors="replace",
        model_max_length=model_max_length, pad_token="<|endoftext|>", split_special_tokens=False,
        tokenizer_class="Qwen2Tokenizer", unk_token=None,
    ))
    _write_json(out / "special_tokens_map.json", dict(
        additional_special_tokens=additional, eos_token=_added_token("<|im_end|>"),
        pad_token=_added_token("<|endoftext|>"),
    ))


def write_processor_files(out: Path, config, options: TinyOptions) -> None:
    """preprocessor_config.json (image processor, sizes from the vision config) and chat_template.json."""
    vision = config.vision_config
    _write_json(out / "preprocessor_config.json", dict(
        image_processor_type="Qwen2VLImageProcessor", processor_class="Qwen2_5_VLProcessor",
        min_pixels=options.min_pixels, max_pixels=options.max_pixels, patch_size=vision.patch_size,
        temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size,
        image_mean=_IMAGE_MEAN, image_std=_IMAGE_STD,
    ))
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})


def write_model_files(model, tok, out: Path, options: TinyOptions) -> None:
    """config.json, generation_config.json and the safetensors, through ``save_pretrained``."""
    from transformers import GenerationConfig

    ids = _token_ids(tok)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    kwargs = {"max_shard_size": options.max_shard_size} if options.max_shard_size else {}
    model.save_pretrained(out, **kwargs)


def _readme(options: TinyOptions, n_tokens: int) -> str:
    cmd = ["python", "tools/make_tiny_qwen25vl.py", "--output", "DIR", "--seed", str(options.seed),
           "--dtype", options.dtype, "--init-std", str(options.init_std),
           "--min-pixels", str(options.min_pixels), "--max-pixels", str(options.max_pixels)]
    cmd += ["--tie-embeddings"] if options.tie_embeddings else []
    if options.bpe_vocab_size != TinyOptions.bpe_vocab_size:
        cmd += ["--bpe-vocab-size", str(options.bpe_vocab_size)]
    cmd += ["--max-shard-size", options.max_shard_size] if options.max_shard_size else []
    for key, value in options.overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value, separators=(',', ':'))}"]
    return (
        "# Tiny random Qwen2.5-VL (a test fixture, NOT a trained model)\n\n"
        "Written by `tools/make_tiny_qwen25vl.py` (`megatron_vgpo.models.qwen2_5_vl.tiny`): random weights,\n"
        f"a {n_tokens}-token byte-level BPE tokenizer ending with the 22 Qwen2.5 special tokens.\n\n"
        f"Rebuild (byte-identical with the same transformers/tokenizers versions):\n\n    {shlex.join(cmd)}\n"
    )


def write_tiny_checkpoint(output: str | os.PathLike, options: TinyOptions = TinyOptions(),
                          force: bool = False) -> Path:
    """Write the checkpoint directory ``output`` atomically and return its path.

    Everything is written into a sibling ``<output>.tmp-XXXX`` directory that is renamed to ``output``
    only when complete, so a crash never leaves a directory that looks whole. A non-empty ``output`` is
    refused unless ``force``.
    """
    if options.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {options.dtype!r}")
    out = Path(output).absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty; pass force=True (--force) to replace it")

    tok = build_tokenizer(options.bpe_vocab_size)
    config = build_config(tok, options)
    model = build_model(config, options)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        write_model_files(model, tok, tmp, options)
        write_tokenizer_files(tok, tmp, config.text_config.max_position_embeddings)
        write_processor_files(tmp, config, options)
        (tmp / "README.md").write_text(_readme(options, tok.get_vocab_size()), encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp (and save_pretrained, for the weights) make them private
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{out.name}.old-", dir=out.parent))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------------
# Loading


def load_processor(path: str | os.PathLike):
    """The Qwen2.5-VL processor of checkpoint ``path``, with or without torchvision.

    With torchvision this is ``AutoProcessor.from_pretrained``. Without it transformers 5.19 cannot
    build ``Qwen2_5_VLProcessor`` at all (the video processor needs torchvision and is always loaded),
    so an image-only subclass is returned instead: same tokenizer, PIL image processor
    (``Qwen2VLImageProcessorPil``), chat template and image-token expansion; videos are unsupported.
    """
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(path)
    return _image_only_processor_class().from_pretrained(path)


def _image_only_processor_class():
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2_5_VLProcessor without a video processor (ProcessorMixin reads the attributes it loads
        and checks from this ``__init__`` signature)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2_5_VLProcessor
