"""The experience of one RL step: rollouts turned into the token-aligned tensors the policy trains on.

Every tensor is ``[B, L]`` over the concatenated ``prompt + response`` tokens of a response, right
padded, and aligned on the TOKEN's own position: ``response_mask[b, q]`` marks response tokens,
``old_logprobs[b, q]`` is the log-prob of token ``q`` (predicted at ``q - 1``; the model's
``logprobs`` are shifted right by one to get there, see ``token_aligned``), and ``rho[b, q]`` reads
the hidden state AT token ``q`` (VGPO_SPEC: "the hidden state of response token t is read at the
position OF token t"). One alignment for everything keeps the masks single.

Images stay per row (``pixel_values[b]``: that row's patches; the ``n`` responses of a prompt share
the same tensor object, nothing is copied) and are concatenated per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_vgpo.models.qwen2_5_vl.pipeline import PolicyBatch


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
    pixel_values: list  # [B] of [N_patches_b, D] or None
    image_grid_thw: list  # [B] of [N_images_b, 3] or None
    group_ids: torch.Tensor  # [B] int64, same id = same prompt
    rewards: torch.Tensor  # [B] float
    rollout_logprobs: torch.Tensor  # [B, L] float, the engine's log-probs of the sampled tokens
    old_logprobs: Optional[torch.Tensor] = None  # [B, L], from the pi_old pass
    rho: Optional[torch.Tensor] = None  # [B, L], VGPO focus scores from the same pass
    advantages: Optional[torch.Tensor] = None  # [B, L], token-level (shaped) advantages

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def has_image(self) -> torch.Tensor:
        return self.image_mask.any(-1)

    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())


def build_experience(prompt_ids: Sequence[Sequence[int]], pixel_values: Sequence, image_grid_thw: Sequence,
                     responses: Sequence[Sequence[int]], response_logprobs: Sequence[Sequence[float]],
                     group_ids: Sequence[int], rewards: Sequence[float], *, pad_token_id: int,
                     image_token_id: int) -> Experience:
    """Rows ``prompt_ids[i] + responses[i]`` (prompts already expanded: one ``<|image_pad|>`` per
    merged patch, as the processor returns them) -> an ``Experience``. All sequences are per row."""
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, responses)]
    B, L = len(lengths), max(lengths)
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros(B, L, dtype=torch.bool)
    rollout_lp = torch.zeros(B, L)
    for b, (p, r, lp) in enumerate(zip(prompt_ids, responses, response_logprobs)):
        input_ids[b, :len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        input_ids[b, len(p):len(p) + len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        response_mask[b, len(p):len(p) + len(r)] = True
        rollout_lp[b, len(p):len(p) + len(r)] = torch.as_tensor(list(lp), dtype=torch.float32)
    attention_mask = torch.arange(L).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    image_mask = (input_ids == image_token_id) & attention_mask & ~response_mask
    return Experience(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
                      image_mask=image_mask, pixel_values=list(pixel_values), image_grid_thw=list(image_grid_thw),
                      group_ids=torch.as_tensor(list(group_ids), dtype=torch.long),
                      rewards=torch.as_tensor(list(rewards), dtype=torch.float32), rollout_logprobs=rollout_lp)


def _cat_or_none(items: list) -> Optional[torch.Tensor]:
    present = [x for x in items if x is not None]
    return torch.cat(present) if present else None


def micro_batches(exp: Experience, rows: Sequence[int], micro_batch_size: int, **extra) -> list[PolicyBatch]:
    """``PolicyBatch``es of ``micro_batch_size`` of ``rows``, each trimmed to its longest row.

    ``extra`` names ``[B, ...]`` tensors of ``exp`` (or given ones) sliced into ``batch.extra`` with
    ``response_mask`` and ``image_mask``; ``batch.extra["rows"]`` holds the row indices.
    """
    out = []
    for start in range(0, len(rows), micro_batch_size):
        idx = torch.as_tensor(list(rows[start:start + micro_batch_size]), dtype=torch.long)
        width = int(exp.attention_mask[idx].sum(-1).max())
        fields = {"response_mask": exp.response_mask, "image_mask": exp.image_mask, **extra}
        out.append(PolicyBatch(
            input_ids=exp.input_ids[idx, :width],
            attention_mask=exp.attention_mask[idx, :width].long(),
            pixel_values=_cat_or_none([exp.pixel_values[i] for i in idx.tolist()]),
            image_grid_thw=_cat_or_none([exp.image_grid_thw[i] for i in idx.tolist()]),
            extra={"rows": idx, **{k: v[idx, :width] if v.dim() > 1 else v[idx] for k, v in fields.items()}},
        ))
    return out


def scatter_rows(parts: list[tuple[torch.Tensor, torch.Tensor]], num_rows: int, width: int) -> torch.Tensor:
    """Reassemble ``(rows, values [b, w])`` pieces of micro-batches into a zero-padded [num_rows, width]."""
    out = torch.zeros(num_rows, width)
    for rows, values in parts:
        out[rows, :values.shape[1]] = values.float()
    return out
