r"""Format warm-up: a few supervised steps that teach a freshly initialised policy the answer FORMAT
(``<think> </think> \boxed{X}``) before RL, with answers drawn at random so no task knowledge leaks.

A random tiny model never writes ``\boxed{}``, so every reward is 0 and RL has no signal. The warm-up
trains on the train prompts with targets ``format_target(X)`` where ``X`` is drawn uniformly from
the answers of the warm-up batch, independently of the row (the answer VOCABULARY is learnt; which
answer goes with which image is not): afterwards accuracy is at chance and the format reward at 1.
A multi-part row (``PromptExample.parts``) gets ``rewards.parts.structured_target`` instead: its
parts' names in its order, a random count from the batch's part counts in every slot, their sum boxed.

The supervised step is the trainer's own PPO update: with ``old_logprobs`` from a forward pass of the
same weights, the ratio is 1 on the first (only) optimizer step of each batch, and with advantage 1
on every target token the clipped loss' gradient is ``-grad log p`` token-averaged, exactly the
gradient of the token-mean cross-entropy. So warm-up uses the same pipeline schedule, DP gradient
reduction, grad clipping and optimizer as RL. Its learning rate is its own
(``trainer.format_warmup.lr``, set on the optimizer for the warm-up; the LR schedule is not stepped,
its next step restores the RL rate) and it reads its own shuffled pass over the train set, leaving
the RL data position untouched.
"""

from __future__ import annotations

import logging
import random
from typing import Sequence

import torch

from megatron_vgpo.data import PromptDataLoader
from megatron_vgpo.rewards.parts import count_values, structured_target
from megatron_vgpo.training.experience import build_experience
from megatron_vgpo.training.micro_batch import RowImages

logger = logging.getLogger(__name__)


def format_target(answer: str) -> str:
    r"""The response text the warm-up teaches: the format reward's shape with an empty thought."""
    return f"<think> </think> \\boxed{{{answer}}}"


def random_answers(answers: Sequence[str], rng: random.Random) -> list[str]:
    """One answer per row, each drawn uniformly from ``answers`` independently of its row."""
    return [rng.choice(list(answers)) for _ in answers]


def end_of_turn_id(tokenizer) -> int:
    """The token the engine stops at: ``<|im_end|>`` when the tokenizer has it, else EOS."""
    token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if token_id is None or token_id == tokenizer.unk_token_id:
        token_id = tokenizer.eos_token_id
    return int(token_id)


def format_warmup(actor, rollouts, cfg, groups, log) -> None:
    """Run ``cfg.trainer.format_warmup.steps`` supervised steps; ``log(step, metrics)`` gets
    ``warmup/nll`` (token-mean negative log-likelihood of the targets before each step) and
    ``warmup/grad_norm``. Collective over all ranks; weights reach the engine at the next sync."""
    wcfg = cfg.trainer.format_warmup
    loader = PromptDataLoader(rollouts.train_loader.dataset, wcfg.batch_size, shuffle=True,
                              seed=cfg.data.seed + 1)  # its own order: RL's data position is untouched
    tokenizer = rollouts.processor.tokenizer
    eot = end_of_turn_id(tokenizer)
    rng = random.Random(f"megatron_vgpo-format-warmup/{cfg.trainer.seed}")
    rollouts.sleep()  # training only: the engine's memory is free until the next weight sync
    for step in range(1, wcfg.steps + 1):
        examples = loader.next_batch()
        texts = random_answers([ex.answer for ex in examples], rng)
        counts = count_values(ex.parts for ex in examples if ex.parts)
        texts = [structured_target(ex.parts, rng, counts) if ex.parts else format_target(a)
                 for ex, a in zip(examples, texts)]
        targets = [tokenizer.encode(t, add_special_tokens=False) + [eot] for t in texts]
        ids = list(range(groups.dp_rank, len(examples), groups.dp_size))  # this DP rank's rows
        mine = [examples[i] for i in ids]
        images = RowImages.from_prompts(mine, rollouts.pixel_spec, load_pixels=groups.is_first_stage)
        exp = build_experience(
            [ex.input_ids for ex in mine], [targets[i] for i in ids], [[0.0] * len(targets[i]) for i in ids], ids,
            [0.0] * len(ids), images, pad_token_id=rollouts.pad_token_id, image_token_id=rollouts.image_token_id,
            device=groups.device)
        old, _ = actor.forward_statistics(exp)
        exp.old_logprobs = old if old is not None else torch.zeros_like(exp.rollout_logprobs)
        exp.advantages, exp.loss_mask = exp.response_mask.float(), exp.response_mask
        exp.outcome = torch.ones_like(exp.rewards)
        stats = actor.update(exp, [list(range(len(exp)))], cfg.algorithm, lr=wcfg.lr, schedule=False)[0]
        out = {"warmup/grad_norm": stats.grad_norm}
        if old is not None:
            out["warmup/nll"] = float(-(old * exp.response_mask).sum() / exp.response_mask.sum().clamp(min=1))
        log(step, out)
        logger.info("format warm-up %d/%d: %s", step, wcfg.steps,
                    ", ".join(f"{k} {v:.4f}" for k, v in sorted(out.items())))
