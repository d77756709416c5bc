"""The rollout side of a step: prompts -> responses -> rewards -> DAPO dynamic sampling, validation,
weight sync, and which data-parallel rank trains on which groups.

Every rank calls the same methods in the same order (the engine's collectives and the broadcast of
rewards need it) and ends up holding the same ``RolloutStep``. A step's rows refer to their prompt's
``PromptExample`` (one object shared by the ``n`` responses); images are decoded only where pixels
are used: for generation, by the ranks of the rollout group that generates the prompt; for training,
by ``Experience`` building on the first pipeline stage of the data-parallel rank that trains it.

Colocation (engine and trainer share the devices), one step::

    generate (engine awake) ... -> engine.sleep(rollout.sleep_level)       # end of sample()
    log-probs, advantages, update (optimizer states onloaded for the update only)
    empty the allocator cache -> engine.wake_up(["weights"]) -> update_weights -> wake_up(["kv_cache"])
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_vgpo.algorithms.dapo import dynamic_sampling_keep, overlong_penalty
from megatron_vgpo.data import iter_val_batches
from megatron_vgpo.models.qwen2_5_vl.pixels import PixelSpec
from megatron_vgpo.rollout.data_parallel import generate_data_parallel, share
from megatron_vgpo.rollout.metrics import logprob_mismatch
from megatron_vgpo.rollout.types import RolloutRequest, SamplingParams
from megatron_vgpo.utils.device import empty_cache

logger = logging.getLogger(__name__)


def share_groups(groups: list[int], dp_rank: int, dp_size: int) -> list[int]:
    """The contiguous, balanced share of ``groups`` that data-parallel rank ``dp_rank`` trains on."""
    return groups[share(len(groups), dp_rank, dp_size)]


@dataclass
class RolloutStep:
    """All kept responses of one step, the same on every rank. Row-major lists, one entry per response."""

    prompts: list = field(default_factory=list)  # the row's PromptExample (shared by its group's rows)
    responses: list = field(default_factory=list)
    response_logprobs: list = field(default_factory=list)
    group_ids: list = field(default_factory=list)
    rewards: list = field(default_factory=list)
    group_order: list = field(default_factory=list)  # kept group ids, in order
    metrics: dict = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(len(p.input_ids) + len(r) for p, r in zip(self.prompts, self.responses))

    def rows_of(self, groups: list[int]) -> list[int]:
        wanted = {g: i for i, g in enumerate(groups)}
        rows = [r for r, g in enumerate(self.group_ids) if g in wanted]
        return sorted(rows, key=lambda r: (wanted[self.group_ids[r]], r))

    def assignment(self, global_batch_size: int, dp_rank: int, dp_size: int) -> tuple[list[int], list[list[int]]]:
        """``(rows, minibatches)``: this DP rank's rows (global row ids, in training order) and, per
        PPO mini-batch of ``global_batch_size`` groups, the positions of its rows in ``rows``. Each
        mini-batch's groups are shared over the DP ranks, so every rank takes part in every step."""
        rows, minibatches = [], []
        for start in range(0, len(self.group_order), global_batch_size):
            mine = self.rows_of(share_groups(self.group_order[start:start + global_batch_size], dp_rank, dp_size))
            minibatches.append(list(range(len(rows), len(rows) + len(mine))))
            rows += mine
        # The contract the advantage computation and every shaper rely on: groups are data-parallel-local.
        local, total = Counter(self.group_ids[r] for r in rows), Counter(self.group_ids)
        split = [g for g, n in local.items() if n != total[g]]
        if split:
            raise AssertionError(f"groups {split[:5]} are split over data-parallel ranks")
        return rows, minibatches


def _request(example) -> RolloutRequest:
    """The engine request of a prompt: its token ids (image pads expanded; the engine collapses
    them) and its images, decoded now."""
    return RolloutRequest(example.input_ids.tolist(), example.load_images())


class Rollouts:
    """Engine, tokenizer, data, rewards and the resharder, driven by the trainer."""

    def __init__(self, cfg, engine, resharder, processor, train_loader, scorer, groups, rollout_groups):
        self.cfg, self.engine, self.resharder, self.processor = cfg, engine, resharder, processor
        self.train_loader, self.scorer, self.groups, self.rollout_groups = train_loader, scorer, groups, rollout_groups
        tok = processor.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.pixel_spec = PixelSpec.from_processor(processor.image_processor)
        self.next_group_id = 0

    # ---------------------------------------------------------------------------------- sampling

    def _generate(self, examples, sampling: SamplingParams):
        """Responses to ``examples`` (every rank gets them all); a rank decodes only the images of
        the prompts its rollout group generates."""
        return generate_data_parallel(self.engine, examples, sampling, self.rollout_groups, _request)

    def _score(self, examples, batch) -> list:
        """Grade on rank 0 (its worker processes hold the timeouts) and broadcast the results."""
        results = [None]
        if not dist.is_initialized() or dist.get_rank() == 0:
            texts = self.processor.tokenizer.batch_decode(batch.response_token_ids, skip_special_tokens=True)
            ex = [examples[i] for i in batch.request_index]
            results = [self.scorer.score(texts, [e.answer for e in ex],
                                         [{"row_id": e.row_id, "source": e.source, "problem": e.problem} for e in ex])]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(results, src=0)
        return results[0]

    def sample(self, step: int, timer) -> RolloutStep:
        """Rollout batches until ``data.rollout_batch_size`` groups survive dynamic sampling (or
        ``max_batches`` were sampled); keeps a multiple of the data-parallel size of groups."""
        cfg, alg = self.cfg, self.cfg.algorithm
        dyn = alg.dynamic_sampling
        out = RolloutStep()
        sampled, passed, acc_all, fmt_all, lengths, clipped = 0, 0, [], [], [], 0
        errors, timeouts = 0, 0  # grading calls that raised / ran past reward.timeout_s (scored 0)
        for attempt in range(dyn.max_batches if dyn.enable else 1):
            examples = self.train_loader.next_batch()
            seed = cfg.rollout.seed + (step * 1000 + attempt) * 100003
            sampling = SamplingParams.from_rollout_config(cfg.rollout, seed=seed)
            batch = self._generate(examples, sampling)
            results = timer.time("reward", self._score, examples, batch)
            sampled += 1
            gids = [self.next_group_id + i for i in batch.request_index]
            self.next_group_id += len(examples)
            acc = torch.tensor([r.accuracy for r in results], dtype=torch.float32)
            rewards = torch.tensor([r.total for r in results], dtype=torch.float32)
            lens = torch.tensor(batch.response_lengths)
            if alg.overlong.enable:
                rewards += overlong_penalty(lens, cfg.rollout.max_response_length, alg.overlong.buffer_length,
                                            alg.overlong.penalty_factor)
            acc_all += acc.tolist()
            fmt_all += [r.format for r in results]
            errors += sum(r.error is not None for r in results)
            timeouts += sum(r.timed_out for r in results)
            lengths += lens.tolist()
            clipped += sum(f == "length" for f in batch.finish_reasons)
            keep = dynamic_sampling_keep(acc, torch.tensor(gids)) if dyn.enable else torch.ones(len(gids), dtype=torch.bool)
            passed += len({gids[r] for r in torch.nonzero(keep).flatten().tolist()})
            last_chance = attempt == (dyn.max_batches if dyn.enable else 1) - 1
            if last_chance and not out.group_order and not keep.any():
                # Nothing survived any batch: train on this one anyway. Its groups have zero advantage,
                # so the step is a no-op for the policy, but the loop, logs and checkpoints go on.
                logger.warning("dynamic sampling kept no group in %d batches; using the last batch", attempt + 1)
                keep = torch.ones(len(gids), dtype=torch.bool)
            for r in torch.nonzero(keep).flatten().tolist():
                out.prompts.append(examples[batch.request_index[r]])
                out.responses.append(batch.response_token_ids[r])
                out.response_logprobs.append(batch.response_logprobs[r])
                out.group_ids.append(gids[r])
                out.rewards.append(float(rewards[r]))
                if gids[r] not in out.group_order:
                    out.group_order.append(gids[r])
            if len(out.group_order) >= cfg.data.rollout_batch_size:
                break
        self._truncate(out, cfg.data.rollout_batch_size)
        self.sleep()  # training next
        n = len(lengths)
        out.metrics = {
            "reward/accuracy": sum(acc_all) / n, "reward/format": sum(fmt_all) / n,
            "reward/error_rate": errors / n, "reward/timeout_rate": timeouts / n,
            "response_length/mean": sum(lengths) / n, "response_length/max": float(max(lengths)),
            "response_length/clip_ratio": clipped / n, "batch/kept_groups": float(passed),
            "batch/trained_groups": float(len(out.group_order)),
            "batch/sampled_batches": float(sampled),
        }
        return out

    def _truncate(self, out: RolloutStep, max_groups: int) -> None:
        """Keep at most ``max_groups`` groups, a multiple of the DP size (every rank needs rows)."""
        dp = self.groups.dp_size
        keep = min(len(out.group_order), max_groups) // dp * dp
        if keep == len(out.group_order):
            return
        kept = set(out.group_order[:keep])
        rows = [r for r, g in enumerate(out.group_ids) if g in kept]
        for name in ("prompts", "responses", "response_logprobs", "group_ids", "rewards"):
            values = getattr(out, name)
            setattr(out, name, [values[r] for r in rows])
        out.group_order = out.group_order[:keep]

    # ------------------------------------------------------------------------ weights, validation

    def sleep(self) -> None:
        """Free the engine's device memory for training (``rollout.sleep_level``; a no-op on CPU)."""
        self.engine.sleep(level=self.cfg.rollout.sleep_level)

    def sync_weights(self) -> None:
        """Stream the trainer's weights into the engine (every rank, in step): the allocator's cached
        blocks go back to the device first, so that the engine's weights and KV cache fit."""
        empty_cache()
        self.engine.wake_up(["weights"])
        self.engine.update_weights(self.resharder.hf_weights())
        self.engine.wake_up(["kv_cache"])

    def validate(self, val_set) -> dict:
        """Greedy accuracy per validation dataset (``val/accuracy/<name>``) and over all."""
        sampling = SamplingParams.from_rollout_config(self.cfg.rollout, validation=True, seed=self.cfg.rollout.seed)
        correct: dict[str, list[float]] = {}
        for chunk in iter_val_batches(val_set, self.cfg.data.val_batch_size):
            batch = self._generate(chunk, sampling)
            for r, res in zip(batch.request_index, self._score(chunk, batch)):
                correct.setdefault(chunk[r].source, []).append(res.accuracy)
        metrics = {f"val/accuracy/{name}": sum(v) / len(v) for name, v in correct.items()}
        every = [a for v in correct.values() for a in v]
        metrics["val/accuracy"] = sum(every) / max(len(every), 1)
        return metrics

    def mismatch_metrics(self, exp) -> dict:
        """rollout/logprob_mismatch_{mean,max}: engine vs trainer log-probs of the sampled tokens."""
        mismatch = logprob_mismatch(exp.rollout_logprobs, exp.old_logprobs, exp.response_mask)
        if self.groups.dp_size > 1:
            mismatch = mismatch.all_reduce(self.groups.dp_group)
        return mismatch.metrics("rollout/")

    def state_dict(self) -> dict:
        return {"loader": self.train_loader.state_dict(), "next_group_id": self.next_group_id}

    def load_state_dict(self, state: dict) -> None:
        self.train_loader.load_state_dict(state["loader"])
        self.next_group_id = state["next_group_id"]
