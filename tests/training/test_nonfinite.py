"""A NaN/inf loss or gradient skips the optimizer step: weights and optimizer state bit-identical to
before it, the step counted (``actor/skipped_steps``), and the run stops with a clear error after
``optimizer.max_consecutive_nonfinite`` such steps in a row."""

from __future__ import annotations

import pytest
import torch

from megatron_vgpo.config.schema import AlgorithmConfig
from megatron_vgpo.training.actor import update_metrics
from tests.training.test_colocation import optimizer_state, tiny_actor, train_steps
from tests.training.test_format_warmup import parity_experience


def poisoned_update(actor, value: float):
    exp = parity_experience(actor.chunks[0].hf_config)
    exp.old_logprobs, _ = actor.forward_statistics(exp)
    exp.advantages = exp.response_mask.float()
    exp.advantages[0, exp.response_mask[0].nonzero()[0, 0]] = value  # one response token of row 0
    exp.loss_mask, exp.outcome = exp.response_mask, torch.zeros(len(exp))
    return actor.update(exp, [[0, 1, 2]], AlgorithmConfig())


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_nonfinite_step_is_skipped_and_leaves_everything_as_it_was(world_of_one, value):
    actor = tiny_actor(world_of_one, offload=False)
    train_steps(actor, 1)  # Adam moments exist: the skipped step must not touch them either
    weights = {n: p.detach().clone() for n, p in actor.chunks[0].named_parameters()}
    state = optimizer_state(actor)
    stats = poisoned_update(actor, value)
    assert stats[0].skipped
    assert all(torch.equal(p, weights[n]) for n, p in actor.chunks[0].named_parameters())
    after = optimizer_state(actor)
    assert all(torch.equal(state[k], after[k]) for k in state)
    metrics = update_metrics(stats)
    assert metrics["actor/skipped_steps"] == 1.0
    train_steps(actor, 1)  # a finite step afterwards trains again
    assert not all(torch.equal(p, weights[n]) for n, p in actor.chunks[0].named_parameters())


def test_consecutive_nonfinite_steps_stop_the_run_by_name(world_of_one):
    actor = tiny_actor(world_of_one, offload=False)
    actor.max_consecutive_nonfinite = 2
    poisoned_update(actor, float("nan"))
    with pytest.raises(RuntimeError, match="2 optimizer steps in a row.*optimizer.max_consecutive_nonfinite=2"):
        poisoned_update(actor, float("nan"))
