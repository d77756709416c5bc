"""The format warm-up (``training/format_warmup.py``): its supervised step is the actor's PPO update
with ratio 1 and advantage 1, whose gradient must be that of the token-mean cross-entropy; checked
against HF transformers' autograd on the same weights and batch. And its targets carry no answer
knowledge."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_vgpo.config.schema import AlgorithmConfig, ModelConfig, OptimizerConfig
from megatron_vgpo.models.qwen2_5_vl import name_mapping as nm
from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
from megatron_vgpo.models.qwen2_5_vl.loading import global_parameter_names, load_hf_weights
from megatron_vgpo.models.qwen2_5_vl.parity import fixed_multimodal_batch, pixel_spec
from megatron_vgpo.rewards import format_reward, last_boxed
from megatron_vgpo.training.actor import Actor
from megatron_vgpo.training.experience import Experience
from megatron_vgpo.training.format_warmup import format_target, random_answers
from megatron_vgpo.training.micro_batch import RowImages
from tests.conftest import tiny_hf_config, tiny_hf_model

RESPONSE_TOKENS = 6  # the last 6 tokens of each row of the parity batch play the target


def parity_experience(hf_config) -> Experience:
    """The fixed multimodal parity batch (3 rows: one image, two images, none) as an Experience."""
    batch = fixed_multimodal_batch(hf_config)
    lengths = batch.attention_mask.sum(-1)
    positions = torch.arange(batch.input_ids.shape[1]).unsqueeze(0)
    attention = batch.attention_mask.bool()
    response = attention & (positions >= (lengths - RESPONSE_TOKENS).unsqueeze(1))
    slots, first = [], 0
    for count in batch.images_per_row:
        slots.append(tuple(range(first, first + count)))
        first += count
    images = RowImages(batch.image_grid_thw, slots, list(batch.images), pixel_spec(hf_config))
    B = len(batch.images_per_row)
    return Experience(input_ids=batch.input_ids, attention_mask=attention, response_mask=response,
                      image_mask=(batch.input_ids == hf_config.image_token_id) & attention, images=images,
                      lengths=lengths.tolist(), group_ids=torch.arange(B), rewards=torch.zeros(B),
                      rollout_logprobs=torch.zeros(batch.input_ids.shape))


def test_the_warmup_step_has_the_gradient_of_token_mean_cross_entropy(world_of_one):
    hf_model = tiny_hf_model(tiny_hf_config(tie_word_embeddings=False), seed=5)
    chunks = build_policy(hf_model.config, ModelConfig(params_dtype="float32", attention_backend="local"), world_of_one)
    load_hf_weights(chunks, list(hf_model.state_dict().items()))
    # clip_grad 0: the gradient left in Megatron's buffers is then the raw one.
    actor = Actor(chunks, world_of_one, OptimizerConfig(lr=1e-3, clip_grad=0.0, use_distributed_optimizer=False),
                  micro_batch_size=2, total_steps=10)
    exp = parity_experience(hf_model.config)
    exp.old_logprobs, _ = actor.forward_statistics(exp)
    exp.advantages, exp.loss_mask = exp.response_mask.float(), exp.response_mask
    exp.outcome = torch.ones(len(exp))
    lr_before = actor.optimizer.param_groups[0]["lr"]
    stats = actor.update(exp, [list(range(len(exp)))], AlgorithmConfig(), lr=3e-4, schedule=False)[0]
    assert stats.lr == 3e-4 and actor.scheduler.num_steps == 0
    assert lr_before != 3e-4
    ours = dict(nm.megatron_to_hf(((n, p.main_grad) for n, p in global_parameter_names(actor.chunks[0])),
                                  actor.chunks[0].arch))

    # Reference: HF autograd of -mean over target tokens of log p(token), weights as before the step.
    batch = fixed_multimodal_batch(hf_model.config)
    hf_model.zero_grad()
    out = hf_model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                         mm_token_type_ids=(batch.input_ids == hf_model.config.image_token_id).int())
    log_p = torch.log_softmax(hf_model.lm_head(out.last_hidden_state).float(), dim=-1)
    token_logp = log_p[:, :-1].gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # token q at q - 1
    mask = exp.response_mask[:, 1:]
    loss = -(token_logp * mask).sum() / mask.sum()
    loss.backward()
    theirs = {nm.canonical_hf_name(n): p.grad for n, p in hf_model.named_parameters()}

    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    scale = max(theirs[k].abs().max().item() for k in theirs)
    print(f"max |grad(warm-up step) - grad(HF token-mean CE)| = {worst:.2e} (largest grad {scale:.2e})")
    assert worst < 1e-5 and scale > 1e-3
    assert abs(float(-(exp.old_logprobs * exp.response_mask).sum() / exp.response_mask.sum()) - loss.item()) < 1e-5


def test_targets_have_the_rewarded_format_and_answers_independent_of_rows():
    target = format_target("3")
    assert format_reward(target) == 1.0 and last_boxed(target) == "3"
    rows = [str(i % 4) for i in range(4000)]
    drawn = random_answers(rows, random.Random(0))
    assert drawn == random_answers(rows, random.Random(0))  # seeded
    assert set(drawn) == set(rows)
    agree = sum(a == b for a, b in zip(drawn, rows)) / len(rows)
    assert agree == pytest.approx(0.25, abs=0.03)  # chance: the row's own answer is not favoured
