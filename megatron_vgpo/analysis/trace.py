"""Teacher-force one response through the HF Qwen2.5-VL and read what the analysis needs from it.

One forward pass over prompt + response gives, per response token t, the final layer's attention row
(heads averaged) split by key class (``metrics.attention_shares``) and the focus score rho_t
(``algorithms.vgpo.visual_focus_scores`` on the final hidden states, after the final norm). Teacher
forcing gives the same rows as decoding did: a causal row at position t sees exactly what the
decoder saw when it read token t.

Only the final layer's attention is kept: a forward hook on its attention module reads the softmax
weights the eager implementation returns and averages the heads at once. ``output_attentions=True``
would keep every layer's ``[H, L, L]`` (28 layers x 28 heads x L^2 floats on a 7B). The text model
runs eager attention (SDPA and flash-attention never materialise the weights); the vision tower keeps
SDPA, since its sequence is the image patches and no analysis reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from megatron_vgpo.algorithms.vgpo import visual_focus_scores
from megatron_vgpo.analysis.metrics import GENERATED, IMAGE, OTHER, QUESTION, attention_shares

VISION_MARKERS = ("<|vision_start|>", "<|vision_end|>")


@dataclass
class Item:
    """One response to analyse, with everything needed to rebuild its forward pass."""

    id: str
    benchmark: str
    prompt_text: str
    """Chat-templated prompt with ONE ``<|image_pad|>`` per image (the processor expands them)."""
    images: list[Image.Image] = field(repr=False)
    """RGB images at their final size (sides multiples of 28): the processor does not resize them."""
    response_ids: list[int]
    """Response token ids, end-of-turn token excluded."""
    correct: bool
    response: str = ""
    label: str | None = None


@dataclass
class ResponseTrace:
    """What one teacher-forced response yields (T = response length)."""

    id: str
    benchmark: str
    correct: bool
    shares: torch.Tensor
    """[T, 4] float32 raw attention shares per step (image, question, generated, other); rows sum to 1."""
    rho: torch.Tensor
    """[T] float32 focus score (paper form, (S + 1) / 2)."""

    @property
    def length(self) -> int:
        return self.shares.shape[0]


def load_model(path: str, device: torch.device, dtype: torch.dtype):
    """The HF model with eager attention in the text decoder (SDPA in the vision tower), in eval mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=dtype, attn_implementation={"text_config": "eager", "vision_config": "sdpa"})
    return model.to(device).eval()


def decoder_layers(model) -> torch.nn.ModuleList:
    """The text decoder layers of a ``Qwen2_5_VLForConditionalGeneration``."""
    return model.model.language_model.layers


class FinalLayerAttention:
    """Context manager: records the head-averaged attention weights of ``layers[-1]`` on each forward.

    ``weights`` is ``[B, L, L]`` float32 after a forward. The attention module must return
    ``(output, weights)`` with real weights, as HF's eager attention does.
    """

    def __init__(self, layers: torch.nn.ModuleList):
        self.module = layers[-1].self_attn
        self.weights: torch.Tensor | None = None
        self._handle = None

    def _hook(self, module, args, output) -> None:
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise RuntimeError("the final attention layer returned no weights: load the model with "
                               "attn_implementation eager for the text decoder (analysis.trace.load_model)")
        self.weights = weights.float().mean(dim=1)  # [B, H, L, L] -> [B, L, L]

    def __enter__(self) -> "FinalLayerAttention":
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def position_classes(input_ids: torch.Tensor, prompt_length: int, tokenizer, image_token_id: int) -> torch.Tensor:
    """The class of every position of one sequence (``metrics.CLASSES``). -> [L] long

    image: ``<|image_pad|>``; question: the user turns' content (text between the ``user`` header and
    its ``<|im_end|>``), vision markers excluded; generated: positions from ``prompt_length`` on;
    other: everything else (system turn, ``<|im_start|>``/role headers, ``<|im_end|>``, vision markers).
    A role header ends at the first token containing a newline, as the chat template writes it.
    """
    ids = input_ids.tolist()
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    markers = tokenizer.convert_tokens_to_ids(list(VISION_MARKERS))
    classes = torch.full((len(ids),), OTHER, dtype=torch.long)
    starts = [i for i in range(prompt_length) if ids[i] == im_start]
    for s in starts:  # a handful of turns: a Python loop over turns, not over tokens
        header_end = next((h for h in range(s + 1, prompt_length) if "\n" in tokenizer.decode([ids[h]])), None)
        if header_end is None:
            continue
        if tokenizer.decode(ids[s + 1:header_end + 1]).strip() != "user":
            continue
        end = next((e for e in range(header_end + 1, prompt_length) if ids[e] == im_end), prompt_length)
        classes[header_end + 1:end] = QUESTION
    prompt = torch.arange(len(ids)) < prompt_length
    classes[prompt & torch.isin(input_ids.cpu(), torch.tensor(markers))] = OTHER
    classes[input_ids.cpu() == image_token_id] = IMAGE
    classes[~prompt] = GENERATED
    return classes


def encode(processor, item: Item, device: torch.device) -> tuple[dict, int]:
    """Model inputs ``[1, L]`` for prompt + response (on ``device``), and the prompt length."""
    enc = processor(text=[item.prompt_text], images=item.images or None, return_tensors="pt", do_resize=False)
    prompt_length = enc["input_ids"].shape[1]
    response = torch.tensor([item.response_ids], dtype=torch.long)
    inputs = {
        "input_ids": torch.cat([enc["input_ids"], response], dim=1),
        "attention_mask": torch.ones(1, prompt_length + response.shape[1], dtype=torch.long),
        "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"], torch.zeros_like(response)], dim=1),
    }
    if item.images:
        inputs["pixel_values"] = enc["pixel_values"]
        inputs["image_grid_thw"] = enc["image_grid_thw"]
    return {k: v.to(device) for k, v in inputs.items()}, prompt_length


@torch.no_grad()
def forward_final_layer(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(final-layer attention [B, L, L] heads averaged, final hidden states [B, L, d] after the norm)."""
    with FinalLayerAttention(decoder_layers(model)) as recorder:
        out = model.model(**inputs, use_cache=False)
    return recorder.weights, out.last_hidden_state


def trace_response(model, processor, item: Item) -> ResponseTrace:
    """Teacher-force ``item`` and return its per-step attention shares and focus scores."""
    device = next(model.parameters()).device
    inputs, prompt_length = encode(processor, item, device)
    input_ids = inputs["input_ids"]
    attn, hidden = forward_final_layer(model, inputs)
    classes = position_classes(input_ids[0], prompt_length, processor.tokenizer, model.config.image_token_id)
    response_mask = (classes == GENERATED).unsqueeze(0).to(device)
    image_mask = input_ids == model.config.image_token_id
    rho = visual_focus_scores(hidden, image_mask, response_mask)  # [1, L]
    shares = attention_shares(attn, classes.unsqueeze(0).to(device), response_mask)  # [1, L, 4]
    return ResponseTrace(id=item.id, benchmark=item.benchmark, correct=item.correct,
                         shares=shares[response_mask].cpu(), rho=rho[response_mask].float().cpu())
