"""The LR schedule counts optimizer steps: warmup configured in trainer steps, decay reaching ``min_lr``
exactly at the run's last optimizer step, and every trainer step advancing it by the same amount."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vgpo.config import load_config
from megatron_vgpo.config.schema import OptimizerConfig
from megatron_vgpo.training.actor import lr_scheduler, schedule_increments
from megatron_vgpo.training.build import optimizer_steps_per_rl_step
from tests.conftest import REPO

TOTAL, K, WARMUP = 10, 4, 2  # trainer steps, optimizer steps per trainer step, warmup trainer steps


def run_schedule(style: str, minibatches_per_step=lambda step: K) -> list[list[float]]:
    """The LR of every optimizer step, per trainer step, driven as ``Actor.update`` drives it."""
    cfg = OptimizerConfig(lr=1e-3, min_lr=1e-5, lr_warmup_steps=WARMUP, lr_decay_style=style)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    scheduler = lr_scheduler(opt, cfg, TOTAL, K)
    lrs = []
    for step in range(TOTAL):
        scheduler.step(increment=0)
        m = minibatches_per_step(step)
        lrs.append([])
        for increment in schedule_increments(m, K):
            lrs[-1].append(opt.param_groups[0]["lr"])
            scheduler.step(increment=increment)
        assert scheduler.num_steps == (step + 1) * K  # aligned with the trainer step
    return lrs


def expected(position: int, style: str) -> float:
    """Hand-written: warmup from 0 over WARMUP x K optimizer steps, then decay over the rest, the
    last optimizer step (position TOTAL x K - 1) at min_lr."""
    lr, min_lr, warmup, last = 1e-3, 1e-5, WARMUP * K, TOTAL * K - 1
    if position <= warmup:
        return lr * position / warmup
    ratio = (position - warmup) / (last - warmup)
    if style == "linear":
        return lr - (lr - min_lr) * ratio
    return min_lr + (lr - min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_decay_reaches_min_lr_at_the_last_optimizer_step(style):
    flat = [lr for step in run_schedule(style) for lr in step]
    assert len(flat) == TOTAL * K
    assert flat[-1] == pytest.approx(1e-5, rel=1e-12)
    assert flat[WARMUP * K] == pytest.approx(1e-3, rel=1e-12)  # warmup ends after WARMUP trainer steps
    for position, lr in enumerate(flat):
        assert lr == pytest.approx(expected(position, style), rel=1e-9, abs=1e-15), position
    assert all(a > b for a, b in zip(flat[WARMUP * K:], flat[WARMUP * K + 1:]))  # decays every step


def test_a_short_step_keeps_the_schedule_aligned():
    """A step whose dynamic sampling kept fewer groups has fewer mini-batches; the schedule still moves
    by K, so later steps see the LR of an uninterrupted run."""
    full = run_schedule("linear")
    short = run_schedule("linear", lambda step: 2 if step == 4 else K)
    assert short[4] == [full[4][0], full[4][2]] and short[5:] == full[5:]
    assert schedule_increments(4, 4) == [1, 1, 1, 1] and schedule_increments(3, 4) == [1, 1, 2]
    assert sum(schedule_increments(1, 7)) == 7


def test_optimizer_steps_per_trainer_step_from_the_config():
    cfg = load_config(REPO / "examples" / "configs" / "qwen25vl_32b.yaml")
    assert optimizer_steps_per_rl_step(cfg) == 512 // 128  # rollout batch / global batch, one epoch
    cfg = load_config(REPO / "examples" / "configs" / "qwen25vl_32b.yaml", ["algorithm.ppo_epochs=2"])
    assert optimizer_steps_per_rl_step(cfg) == 8
