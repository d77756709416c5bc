"""The rollout-vs-trainer log-prob mismatch metric against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from megatron_vgpo.rollout.metrics import LogprobMismatch, logprob_mismatch


def test_mean_and_max_over_valid_tokens_only():
    rollout = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]])
    trainer = torch.tensor([[-1.1, -2.0, -2.5], [-0.25, 0.0, float("nan")]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    m = logprob_mismatch(rollout, trainer, mask)
    # |diffs| on valid tokens: 0.1, 0, 0.5, 0.25 -> mean 0.85 / 4, max 0.5; padding (9, nan) ignored
    assert m.mean == pytest.approx(0.85 / 4)
    assert float(m.abs_diff_max) == pytest.approx(0.5)
    assert float(m.num_tokens) == 4
    assert m.metrics() == {"rollout/logprob_diff_mean": pytest.approx(0.2125),
                           "rollout/logprob_diff_max": pytest.approx(0.5)}


def test_accumulates_over_micro_batches_as_one_token_mean():
    a = logprob_mismatch(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[1, 1]]))
    b = logprob_mismatch(torch.tensor([[0.0, 0.0]]), torch.tensor([[4.0, 0.0]]), torch.tensor([[1, 0]]))
    total = a + b
    assert total.mean == pytest.approx(6 / 3) and float(total.abs_diff_max) == 4.0


def test_no_valid_token_gives_zeros_and_shapes_are_checked():
    m = logprob_mismatch(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert m.mean == 0.0 and float(m.abs_diff_max) == 0.0
    empty = logprob_mismatch(torch.zeros(0, 0), torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool))
    assert isinstance(empty, LogprobMismatch) and empty.mean == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_mismatch(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_trainer_dtype_and_gradient_do_not_matter():
    trainer = torch.tensor([[-1.0, -2.0]], dtype=torch.bfloat16, requires_grad=True)
    m = logprob_mismatch(torch.tensor([[-1.0, -2.5]]), trainer, torch.ones(1, 2, dtype=torch.bool))
    assert m.mean == pytest.approx(0.25)
