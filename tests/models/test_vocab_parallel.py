"""Vocab-parallel log-probs and entropy against a plain log-softmax (TP=1; TP=2 runs in the
distributed parity and gradient tests)."""

from __future__ import annotations

import torch

from megatron_vgpo.models.qwen2_5_vl.vocab_parallel import vocab_parallel_logprobs


def test_logprobs_entropy_and_gradients_match_log_softmax_ignoring_padding():
    gen = torch.Generator().manual_seed(0)
    vocab, padded = 13, 16
    logits = (3 * torch.randn(5, 2, padded, generator=gen)).requires_grad_()
    with torch.no_grad():
        logits[..., vocab:] = 50.0  # padding rows: huge logits that must not count
    targets = torch.randint(0, vocab, (5, 2), generator=gen)

    logprobs, entropy = vocab_parallel_logprobs(logits, targets, vocab, compute_entropy=True)

    ref_logits = logits[..., :vocab]
    log_p = torch.log_softmax(ref_logits, dim=-1)
    ref_logprobs = log_p.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ref_entropy = -(log_p.exp() * log_p).sum(-1)
    torch.testing.assert_close(logprobs, ref_logprobs, atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy, ref_entropy, atol=1e-6, rtol=0)

    weights = torch.randn(5, 2, generator=gen)
    grad, = torch.autograd.grad((weights * (logprobs + 0.3 * entropy)).sum(), logits)
    ref_grad, = torch.autograd.grad((weights * (ref_logprobs + 0.3 * ref_entropy)).sum(), logits)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=0)
    assert grad[..., vocab:].abs().max() == 0


def test_bfloat16_logits_are_computed_in_float32():
    logits = torch.randn(3, 1, 8).bfloat16()
    logprobs, _ = vocab_parallel_logprobs(logits, torch.zeros(3, 1, dtype=torch.long), 8)
    assert logprobs.dtype == torch.float32
