"""The experience of one RL step: this data-parallel rank's rollouts as token-aligned tensors.

Every tensor is ``[B, L]`` over the concatenated ``prompt + response`` tokens of a response, right
padded, and aligned on the TOKEN's own position: ``response_mask[b, q]`` marks response tokens,
``old_logprobs[b, q]`` is the log-prob of token ``q`` (predicted at ``q - 1``; the model's
``logprobs`` are shifted right by one to get there, see ``token_aligned``), and ``rho[b, q]`` reads
the hidden state AT token ``q`` (VGPO_SPEC: "the hidden state of response token t is read at the
position OF token t"). One alignment for everything keeps the masks single.

Where things live: the ``[B, L]`` and ``[B]`` tensors are on the training device (built on the host
once, moved once); the pi_old pass and the advantages fill theirs on the device too. Images stay on
the host as compact uint8, each distinct image once (``micro_batch.RowImages``), and travel to the
device one micro-batch at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from megatron_vgpo.training.micro_batch import RowImages


def token_aligned(per_prediction: torch.Tensor) -> torch.Tensor:
    """Model outputs indexed by predicting position ``p`` (for token ``p + 1``) -> indexed by token.

    [B, L] -> [B, L]; position 0 (no token predicts it) is 0.
    """
    out = torch.zeros_like(per_prediction)
    out[:, 1:] = per_prediction[:, :-1]
    return out


@dataclass
class Experience:
    """This data-parallel rank's rows of one step (``B`` responses)."""

    input_ids: torch.Tensor  # [B, L] long, prompt + response, right padded
    attention_mask: torch.Tensor  # [B, L] bool
    response_mask: torch.Tensor  # [B, L] bool
    image_mask: torch.Tensor  # [B, L] bool
    images: RowImages  # the rows' images (pixels on the first pipeline stage only)
    lengths: list[int]  # [B] prompt + response tokens per row (host copy: micro-batch widths)
    group_ids: torch.Tensor  # [B] int64, same id = same prompt
    rewards: torch.Tensor  # [B] float
    rollout_logprobs: torch.Tensor  # [B, L] float, the engine's log-probs of the sampled tokens
    rows: list[int] = field(default_factory=list)  # global row ids in the step's RolloutStep
    minibatches: list[list[int]] = field(default_factory=list)  # per PPO mini-batch: positions in this experience
    old_logprobs: Optional[torch.Tensor] = None  # [B, L], from the pi_old pass
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # the methods' pi_old statistics, [B, L] by key
    outcome: Optional[torch.Tensor] = None  # [B] outcome (group) advantages
    advantages: Optional[torch.Tensor] = None  # [B, L], token-level (shaped) advantages
    loss_mask: Optional[torch.Tensor] = None  # [B, L] bool, tokens that keep a policy-gradient term

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.input_ids.device

    @property
    def has_image(self) -> torch.Tensor:
        return self.image_mask.any(-1)

    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())


def build_experience(prompt_ids: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                     response_logprobs: Sequence[Sequence[float]], group_ids: Sequence[int], rewards: Sequence[float],
                     images: RowImages, *, pad_token_id: int, image_token_id: int,
                     device: torch.device | str = "cpu") -> Experience:
    """Rows ``prompt_ids[i] + responses[i]`` (prompts already expanded: one ``<|image_pad|>`` per
    merged patch, as the processor returns them) -> an ``Experience`` on ``device``. All sequences are
    per row; ``images`` has one entry per row."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, responses)]
    B, L = len(lengths), max(lengths)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros(B, L, dtype=torch.bool)
    rollout_lp = torch.zeros(B, L)
    for b, (p, r, lp) in enumerate(zip(prompt_ids, responses, response_logprobs)):
        input_ids[b, :len(p)] = torch.as_tensor(p, dtype=torch.long)
        input_ids[b, len(p):len(p) + len(r)] = torch.as_tensor(r, dtype=torch.long)
        response_mask[b, len(p):len(p) + len(r)] = True
        rollout_lp[b, len(p):len(p) + len(r)] = torch.as_tensor(lp, dtype=torch.float32)
    attention_mask = torch.arange(L).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    image_mask = (input_ids == image_token_id) & attention_mask & ~response_mask
    to = dict(device=device, non_blocking=True)
    return Experience(input_ids=input_ids.to(**to), attention_mask=attention_mask.to(**to),
                      response_mask=response_mask.to(**to), image_mask=image_mask.to(**to), images=images,
                      lengths=lengths, group_ids=torch.as_tensor(list(group_ids), dtype=torch.long).to(**to),
                      rewards=torch.as_tensor(list(rewards), dtype=torch.float32).to(**to),
                      rollout_logprobs=rollout_lp.to(**to))


def scatter_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], num_rows: int, width: int) -> torch.Tensor:
    """Reassemble ``(rows [b], values [b, w])`` pieces of micro-batches into a zero-padded float32
    ``[num_rows, width]`` on the pieces' device."""
    out = torch.zeros(num_rows, width, device=parts[0][1].device)
    for rows, values in parts:
        out[rows, :values.shape[1]] = values.float()
    return out
