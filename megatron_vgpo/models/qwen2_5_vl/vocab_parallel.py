"""Per-token log-probs and entropy from vocabulary-sharded logits, without gathering the vocabulary.

Each tensor-parallel rank holds the logits of a contiguous slice of the vocabulary, ``[..., V / tp]``.
A full gather would cost ``V`` floats per token (152k for Qwen2.5-VL), so, like Megatron's
``vocab_parallel_cross_entropy``, we reduce three scalars per token over the TP group instead:

    m   = max_j z_j                      (all-reduce MAX; a constant shift, no gradient needed)
    S   = sum_j exp(z_j - m)             (all-reduce SUM)
    z_y = the target's logit - m         (all-reduce SUM of the one rank that owns the target)
    T   = sum_j exp(z_j - m) (z_j - m)   (all-reduce SUM, entropy only)

    log p(y) = z_y - log S               entropy = log S - T / S

Every non-linear step uses the reduced values, and the sums are reduced by ``_SumOverTP``, whose
backward is the identity: the result is replicated on the TP ranks and each rank's loss is the
same function of it, so each rank's partial sum receives the full upstream gradient (the convention
of Megatron's tensor-parallel mappings). The gradients are therefore exact, not approximations.

Vocabulary padding (rows added so that TP divides the vocabulary) is sliced off before anything is
computed, so padded logits never enter a max, a sum or the entropy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _SumOverTP(torch.autograd.Function):
    """All-reduce SUM over ``group`` forward; identity backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, tensor, group):
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _sum_over_tp(tensor: torch.Tensor, group, tp_size: int) -> torch.Tensor:
    return tensor if tp_size == 1 else _SumOverTP.apply(tensor, group)


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    tp_group=None,
    tp_rank: int = 0,
    tp_size: int = 1,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probabilities of ``targets`` (and optionally the entropy) under vocab-sharded logits.

    Args:
        logits: ``[..., V_local]`` this TP rank's slice of the (padded) vocabulary; rank r holds
            ids ``[r * V_local, (r + 1) * V_local)``. Any float dtype; computed in float32.
        targets: ``[...]`` integer token ids (the same on every TP rank).
        vocab_size: the real vocabulary size; ids at or beyond it are padding and are ignored.
        tp_group, tp_rank, tp_size: the tensor-parallel group and this rank's place in it.
        compute_entropy: also return the entropy of the full distribution.

    Returns:
        ``(logprobs [...], entropy [...] or None)``, float32, differentiable w.r.t. ``logits``.
        A target outside ``[0, vocab_size)`` gets ``-log S`` (a meaningless but finite value; mask it).
    """
    logits = logits.float()
    v_local = logits.size(-1)
    start = tp_rank * v_local
    n_valid = max(0, min(v_local, vocab_size - start))
    logits = logits[..., :n_valid]

    local_max = logits.amax(dim=-1) if n_valid else logits.new_full(targets.shape, float("-inf"))
    global_max = local_max.detach().clone()
    if tp_size > 1:
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - global_max.unsqueeze(-1)
    exp = shifted.exp()
    sum_exp = _sum_over_tp(exp.sum(dim=-1), tp_group, tp_size)

    owned = (targets >= start) & (targets < start + n_valid)
    if n_valid:
        local_index = (targets - start).clamp(0, n_valid - 1).unsqueeze(-1)
        target_logit = torch.where(owned, shifted.gather(-1, local_index).squeeze(-1), 0.0)
    else:
        target_logit = shifted.new_zeros(targets.shape)
    target_logit = _sum_over_tp(target_logit, tp_group, tp_size)

    log_sum_exp = sum_exp.log()
    logprobs = target_logit - log_sum_exp
    entropy = None
    if compute_entropy:
        weighted = _sum_over_tp((exp * shifted).sum(dim=-1), tp_group, tp_size)
        entropy = log_sum_exp - weighted / sum_exp
    return logprobs, entropy
