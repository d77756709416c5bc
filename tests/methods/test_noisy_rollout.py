"""NoisyRollout (METHODS_SPEC section 5): the noise schedule against hand values; n clean + n noisy
responses per prompt in ONE group; the engine sees the noisy pixels, training sees the clean ones
(bit-identical inputs); noisy rows left out of the rollout/trainer mismatch metric."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_vgpo.methods.noisy_rollout import NoisyRollout, NoisyRolloutConfig, noise_step
from megatron_vgpo.methods.views import ORIGINAL, diffusion_alpha_bar
from megatron_vgpo.models.qwen2_5_vl.pixels import patchify_all, to_uint8
from tests.training.fake_rollout import FakeEngine, config, write_data


def test_noise_schedule_by_hand():
    """t(s) = floor(500 (1 - sigmoid(30 (s - 40) / 100))):
    s=0: sigmoid(-12) = 6.1442e-6 -> floor(499.9969) = 499;  s=40: 250;
    s=50: sigmoid(3) = 0.952574 -> floor(23.7129) = 23;  s=100: sigmoid(18) -> floor(7.6e-6) = 0."""
    assert [noise_step(s, 100, 500, 30, 40) for s in (0, 40, 50, 100)] == [499, 250, 23, 0]
    # s=30 of 200: sigmoid(30 * -10 / 200) = sigmoid(-1.5) = 0.182426 -> floor(408.787) = 408
    assert noise_step(30, 200, 500, 30, 40) == 408
    assert noise_step(0, 10, 2000, 30, 40) == 999  # clamped to the diffusion schedule
    assert NoisyRollout(NoisyRolloutConfig()).metrics(50, 100) == {"noisy_rollout/noise_step": 23.0}


class ImageEngine(FakeEngine):
    """The fake engine, also recording each request's images as uint8 arrays."""

    def __init__(self):
        super().__init__()
        self.images: list[list[np.ndarray]] = []

    def generate(self, requests, sampling):
        self.images += [[np.asarray(im.convert("RGB")) for im in r.images] for r in requests]
        return super().generate(requests, sampling)


@pytest.fixture(scope="module")
def noisy_step(tmp_path_factory):
    from megatron_vgpo.data import PromptDataLoader, PromptDataset
    from megatron_vgpo.methods import build_methods
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor, write_tiny_checkpoint
    from megatron_vgpo.rewards import RewardScorer
    from megatron_vgpo.rollout.data_parallel import RolloutGroups
    from megatron_vgpo.training.logging import StepTimer
    from megatron_vgpo.training.rollout import Rollouts

    root = tmp_path_factory.mktemp("noisy")
    processor = load_processor(write_tiny_checkpoint(root / "ckpt"))
    cfg = config("algorithm.rollout_methods=[noisy_rollout]", "algorithm.dynamic_sampling.enable=false",
                 "trainer.total_steps=100")
    dataset = PromptDataset([str(write_data(root / "data" / "train.parquet", 8))], cfg.data, processor,
                            cfg.rollout.max_prompt_length)
    loader = PromptDataLoader(dataset, cfg.data.rollout_batch_size, cfg.data.shuffle, cfg.data.seed)
    engine = ImageEngine()
    methods = build_methods(cfg.algorithm, processor.tokenizer)
    rollouts = Rollouts(cfg, engine, None, processor, loader, RewardScorer(dataclasses.replace(cfg.reward, num_workers=0)),
                        SimpleNamespace(dp_size=1), RolloutGroups.from_world(0, 1, 1), methods.rollout)
    step = rollouts.sample(50, StepTimer(synchronize=False))
    return cfg, rollouts, engine, step, methods


def test_one_group_of_2n_per_prompt_and_the_schedule_logged(noisy_step):
    cfg, _, engine, step, methods = noisy_step
    n = cfg.rollout.n
    assert methods.group_size(n) == 2 * n
    assert len(step.group_order) == cfg.data.rollout_batch_size
    for gid in step.group_order:
        rows = [r for r, g in enumerate(step.group_ids) if g == gid]
        assert len(rows) == 2 * n
        assert [step.noisy[r] for r in rows] == [False] * n + [True] * n
        assert len({id(step.prompts[r]) for r in rows}) == 1  # every row refers to the prompt's example
    assert step.metrics["noisy_rollout/noise_step"] == 23.0
    assert len(engine.calls[0]) == 2 * cfg.data.rollout_batch_size  # one clean and one noisy request per prompt


def test_the_engine_sees_noise_at_the_scheduled_strength(noisy_step):
    """Clean requests get the prompt's decoded image; noisy ones ``sqrt(abar_t) x + sqrt(1 - abar_t) eps``
    at t = 23: the same size, and the residual's spread matches ``sqrt(1 - abar_23)`` (where unclamped)."""
    _, rollouts, engine, step, _ = noisy_step
    examples = [step.prompts[step.group_ids.index(g)] for g in step.group_order]
    abar = float(diffusion_alpha_bar()[23])
    for k, example in enumerate(examples):
        clean = np.asarray(example.load_images()[0].convert("RGB"))
        sent_clean, sent_noisy = engine.images[2 * k][0], engine.images[2 * k + 1][0]
        assert np.array_equal(sent_clean, clean)
        assert sent_noisy.shape == clean.shape and not np.array_equal(sent_noisy, clean)
        x, y = clean / 255.0, sent_noisy / 255.0
        inside = (y > 0.02) & (y < 0.98)
        residual = (y - math.sqrt(abar) * x)[inside]
        assert residual.std() == pytest.approx(math.sqrt(1 - abar), rel=0.15)


def test_training_inputs_of_noisy_rows_are_bit_identical_to_the_clean_rows(noisy_step):
    """The trainer's inputs of a noisy row (prompt ids, pixels, grid) equal its clean sibling's."""
    from megatron_vgpo.methods.views import view_row_images

    cfg, rollouts, _, step, _ = noisy_step
    rows = list(range(len(step.prompts)))
    images = view_row_images(ORIGINAL, step.prompts, rows, rollouts.pixel_spec, seed=0, step=50, load_pixels=True)
    n = cfg.rollout.n
    for gid in step.group_order:
        group = [r for r, g in enumerate(step.group_ids) if g == gid]
        clean, noisy = group[0], group[n]
        assert torch.equal(step.prompts[clean].input_ids, step.prompts[noisy].input_ids)
        (grid_a, vis_a), (grid_b, vis_b) = images.select([clean]), images.select([noisy])
        assert torch.equal(grid_a, grid_b)
        a, b = vis_a.pixel_values(), vis_b.pixel_values()
        assert a.dtype == b.dtype and torch.equal(a, b)
        # ... and both are the clean image's patches.
        direct = patchify_all([to_uint8(im) for im in step.prompts[clean].load_images()], rollouts.pixel_spec)[0]
        assert torch.equal(a, direct)


def test_noisy_rows_are_left_out_of_the_mismatch_metric(noisy_step):
    _, rollouts, _, step, _ = noisy_step
    rows = list(range(len(step.prompts)))
    B, L = len(rows), 4
    rollout_lp = torch.zeros(B, L)
    trainer_lp = torch.zeros(B, L)
    noisy = torch.tensor(step.noisy)
    trainer_lp[noisy] = -5.0  # the noisy rows' engine log-probs were computed on other pixels
    trainer_lp[~noisy, 0] = -0.25
    exp = SimpleNamespace(rows=rows, rollout_logprobs=rollout_lp, old_logprobs=trainer_lp,
                          response_mask=torch.ones(B, L, dtype=torch.bool), device=torch.device("cpu"))
    metrics = rollouts.mismatch_metrics(exp, step)
    assert metrics["rollout/logprob_diff_max"] == pytest.approx(0.25)
    assert metrics["rollout/logprob_diff_mean"] == pytest.approx(0.25 / L)


def test_the_memory_plan_counts_2n_responses_per_prompt():
    from megatron_vgpo.config import load_config
    from megatron_vgpo.planning.memory import group_size

    assert group_size(load_config(None, ["rollout.n=6"])) == 6
    assert group_size(load_config(None, ["rollout.n=6", "algorithm.rollout_methods=[noisy_rollout]"])) == 12
    assert group_size(load_config(None, ["rollout.n=6", "algorithm.rollout_methods=[vapo]"])) == 6
