"""The typed boundary between the trainer and a rollout engine: requests in, a batch of responses out.

``RolloutRequest``: one prompt (chat-template token ids and its images).
``SamplingParams``: how to sample (``n`` responses per prompt, temperature, ..., seed).
``RolloutBatch``: the responses, flattened prompt-major (the ``n`` responses of request ``i`` are
contiguous and carry ``request_index == i``), with per-token log-probs of the sampled tokens.

Plain Python lists inside: responses have different lengths, the batch is small next to the model,
and every engine produces lists anyway; ``RolloutBatch.padded()`` gives the ``[B, T]`` tensors the
trainer and the mismatch metric use.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Literal, Optional, Sequence

import torch

FinishReason = Literal["stop", "length", "abort"]

# A PIL.Image.Image, or pixels as an HWC / CHW uint8 array (numpy or torch), as the HF image
# processor accepts them. The engine resizes and normalises them with the checkpoint's processor.
ImageInput = Any


@dataclass
class RolloutRequest:
    """One prompt to answer.

    ``prompt_token_ids`` is the chat template rendered and tokenized with ONE ``<|image_pad|>`` per
    image, between ``<|vision_start|>`` and ``<|vision_end|>`` (what ``tokenizer.apply_chat_template``
    gives). An already expanded prompt (each image's pad repeated once per merged patch, what the HF
    processor returns) is accepted too: the engine collapses the runs, since it expands them itself.
    """

    prompt_token_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)
    """The prompt's images, in the order of their ``<|image_pad|>`` tokens."""
    mm_processor_kwargs: Optional[dict[str, Any]] = None
    """Per-request image processor overrides (e.g. ``{"max_pixels": 12544}``); None: the engine's."""


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled. Build it from the config with ``from_rollout_config``."""

    n: int
    """Responses per request (the group size G)."""
    max_tokens: int
    """Generated tokens at most per response (EOS included)."""
    temperature: float
    """0 is greedy."""
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k."""
    seed: Optional[int] = None
    """Sample ``j`` of request ``i`` uses seed ``seed + i * n + j``: the same seed gives the same
    tokens however requests are batched or split over rollout data-parallel groups. None: the
    engine's own random stream (not reproducible across batch compositions)."""
    ignore_eos: bool = False
    """Keep generating after EOS (benchmarks and tests)."""
    allowed_token_ids: Optional[tuple[int, ...]] = None
    """Sample only among these tokens (e.g. VAPO's one-token yes/no probes); None: the whole vocabulary."""

    @classmethod
    def from_rollout_config(cls, rollout, validation: bool = False, seed: Optional[int] = None) -> "SamplingParams":
        """Training sampling from a ``RolloutConfig`` (``n``, ``sampling.*``, ``max_response_length``);
        ``validation=True``: one response per prompt at ``val_temperature``."""
        s = rollout.sampling
        if validation:
            return cls(n=1, max_tokens=rollout.max_response_length, temperature=rollout.val_temperature,
                       top_p=s.top_p if rollout.val_temperature > 0 else 1.0,
                       top_k=s.top_k if rollout.val_temperature > 0 else -1, seed=seed)
        return cls(n=rollout.n, max_tokens=rollout.max_response_length, temperature=s.temperature,
                   top_p=s.top_p, top_k=s.top_k, seed=seed)

    def shifted(self, first_request: int) -> "SamplingParams":
        """The params for a slice of requests starting at ``first_request`` (keeps per-request seeds)."""
        return self if self.seed is None else replace(self, seed=self.seed + first_request * self.n)


@dataclass
class RolloutBatch:
    """Responses, prompt-major: row ``r`` answers request ``request_index[r]``."""

    request_index: list[int]
    """Index of the request (in the list given to ``generate``) this response answers."""
    prompt_token_ids: list[list[int]]
    """The prompt as the engine ran it (image pads expanded, as the HF processor expands them)."""
    response_token_ids: list[list[int]]
    """Generated tokens; a response that stopped on EOS ends with the EOS token."""
    response_logprobs: list[list[float]]
    """Per-token log-probs of the sampled tokens under the raw model distribution (temperature 1,
    before top-k/top-p and token bans): what the trainer's log-prob pass recomputes."""
    finish_reasons: list[FinishReason]
    """"stop" (EOS or a stop token), "length" (max_tokens reached), "abort"."""

    def __post_init__(self):
        n = len(self.request_index)
        sizes = {len(self.prompt_token_ids), len(self.response_token_ids), len(self.response_logprobs),
                 len(self.finish_reasons)}
        if sizes != {n}:
            raise ValueError(f"RolloutBatch fields have different lengths: {sorted(sizes | {n})}")
        for r, (tokens, logprobs) in enumerate(zip(self.response_token_ids, self.response_logprobs)):
            if len(tokens) != len(logprobs):
                raise ValueError(f"response {r}: {len(tokens)} tokens but {len(logprobs)} log-probs")

    def __len__(self) -> int:
        return len(self.request_index)

    @property
    def response_lengths(self) -> list[int]:
        return [len(t) for t in self.response_token_ids]

    @classmethod
    def concat(cls, batches: Sequence["RolloutBatch"], request_offsets: Sequence[int]) -> "RolloutBatch":
        """Batches of consecutive request slices -> one batch; ``request_offsets[k]`` is the index of
        batch ``k``'s first request in the whole list."""
        out = cls([], [], [], [], [])
        for batch, offset in zip(batches, request_offsets):
            out.request_index += [offset + i for i in batch.request_index]
            out.prompt_token_ids += batch.prompt_token_ids
            out.response_token_ids += batch.response_token_ids
            out.response_logprobs += batch.response_logprobs
            out.finish_reasons += batch.finish_reasons
        return out

    def padded(self, pad_token_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tokens [B, T] long, logprobs [B, T] float32, mask [B, T] bool)``, right-padded to the
        longest response; padding has ``pad_token_id``, log-prob 0 and mask False."""
        from torch.nn.utils.rnn import pad_sequence

        if len(self) == 0:
            return torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool)
        tokens = pad_sequence([torch.tensor(t, dtype=torch.long) for t in self.response_token_ids],
                              batch_first=True, padding_value=pad_token_id)
        logprobs = pad_sequence([torch.tensor(lp, dtype=torch.float32) for lp in self.response_logprobs],
                                batch_first=True, padding_value=0.0)
        lengths = torch.tensor(self.response_lengths, dtype=torch.long)
        mask = torch.arange(tokens.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        return tokens, logprobs, mask


NamedTensors = Iterable[tuple[str, torch.Tensor]]
"""An iterable of ``(hf_name, tensor)``: on-disk Hugging Face names (``model.layers.0.mlp...``,
``visual.blocks...``, ``lm_head.weight``), full (unsharded) tensors; the engine shards them."""
