"""The rollout side of a step: prompts -> responses -> rewards -> DAPO dynamic sampling, validation,
weight sync, and which data-parallel rank trains on which groups.

Every rank calls the same methods in the same order (the engine's collectives and the all-gather of
grades need it) and ends up holding the same ``RolloutStep``. A step's rows refer to their prompt's
``PromptExample`` (one object shared by the ``n`` responses); images are decoded only where pixels
are used: for generation, by the ranks of the rollout group that generates the prompt (in a
background thread, while the engine generates the batch before); for training, by ``Experience``
building on the first pipeline stage of the data-parallel rank that trains it. Every rank grades a
share of each batch (``rewards/distributed.py``), while the engine generates the next batch when
dynamic sampling will most likely need it (``Rollouts.sample``). The rollout-side methods
(``algorithm.rollout_methods``) add image views to generate on (NoisyRollout's noisy rows, in the
prompt's group) and reward terms computed after grading, before dynamic sampling (VAPO's probes,
answered by the engine: ``timing_s/probes``).

Colocation (engine and trainer share the devices), one step::

    generate (engine awake) ... -> engine.sleep(rollout.sleep_level)       # end of sample()
    log-probs, advantages, update (optimizer states onloaded for the update only)
    empty the allocator cache -> engine.wake_up(["weights"]) -> update_weights -> wake_up(["kv_cache"])
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter, deque
from dataclasses import dataclass, field

import torch
from PIL import Image

from megatron_vgpo.algorithms.dapo import dynamic_sampling_keep, overlong_penalty
from megatron_vgpo.data.loader import val_batch_ranges
from megatron_vgpo.data.prefetch import ImagePrefetcher, Prepared
from megatron_vgpo.methods.base import RewardInputs, RolloutMethod
from megatron_vgpo.methods.views import perturbed_images
from megatron_vgpo.models.qwen2_5_vl.pixels import PixelSpec
from megatron_vgpo.rewards.distributed import DistributedGrader, PendingGrades, rank_scorer
from megatron_vgpo.rewards.parts import grade_parts, part_accuracy
from megatron_vgpo.rollout.data_parallel import generate_data_parallel, share
from megatron_vgpo.rollout.metrics import logprob_mismatch
from megatron_vgpo.rollout.types import RolloutBatch, RolloutRequest, SamplingParams
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
    noisy: list = field(default_factory=list)  # generated on a perturbed image view (NoisyRollout's extra rows)
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


@dataclass
class _Generated:
    """A generated rollout batch of the sampling loop, with what generating it took."""

    indices: list[int]  # dataset indices of its prompts (its loader batch)
    prepared: Prepared  # its examples and this rollout group's decoded images
    batch: RolloutBatch  # request_index: the row's prompt (position in ``examples``)
    noisy: list[bool]  # [rows] generated on an extra image view (a rollout method's), not the original

    @property
    def examples(self) -> list:
        return self.prepared.examples


@dataclass
class _Tally:
    """What the sampled batches of a step add up to (``sample``'s metrics)."""

    sampled: int = 0
    passed: int = 0
    accuracy: list = field(default_factory=list)
    format: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    errors: int = 0  # grading calls that raised (scored 0)
    timeouts: int = 0  # grading calls that ran past reward.timeout_s (scored 0)
    clipped: int = 0
    method: dict = field(default_factory=dict)  # rollout methods' metrics: name -> one value per batch

    def add_method_metrics(self, metrics: dict) -> None:
        for name, value in metrics.items():
            self.method.setdefault(name, []).append(value)

    def metrics(self, out: RolloutStep) -> dict:
        n = len(self.lengths)
        return {
            **{name: sum(v) / len(v) for name, v in self.method.items()},  # mean over the step's batches
            "reward/accuracy": sum(self.accuracy) / n, "reward/format": sum(self.format) / n,
            "reward/error_rate": self.errors / n, "reward/timeout_rate": self.timeouts / n,
            "response_length/mean": sum(self.lengths) / n, "response_length/max": float(max(self.lengths)),
            "response_length/clip_ratio": self.clipped / n, "batch/kept_groups": float(self.passed),
            "batch/trained_groups": float(len(out.group_order)), "batch/sampled_batches": float(self.sampled),
        }


class Rollouts:
    """Engine, tokenizer, data, rewards and the resharder, driven by the trainer.

    ``scorer``: this rank's ``RewardScorer`` (None: one is built from ``cfg.reward``, its pool sized to
    the node); every rank grades a share of each batch. ``rollout_methods``: the configured
    ``RolloutMethod``s (extra generation views, reward terms; ``Methods.rollout``).
    """

    PASS_RATE_WINDOW = 8
    """Recent batches whose dynamic-sampling pass rates decide speculation (``_worth_speculating``)."""

    def __init__(self, cfg, engine, resharder, processor, train_loader, scorer, groups, rollout_groups,
                 rollout_methods=()):
        self.cfg, self.engine, self.resharder, self.processor = cfg, engine, resharder, processor
        self.rollout_methods = list(rollout_methods)
        self.train_loader, self.groups, self.rollout_groups = train_loader, groups, rollout_groups
        self.grader = DistributedGrader(scorer if scorer is not None else rank_scorer(cfg.reward))
        self.prefetcher = ImagePrefetcher()
        tok = processor.tokenizer
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.image_token_id = tok.convert_tokens_to_ids("<|image_pad|>")
        self.pixel_spec = PixelSpec.from_processor(processor.image_processor)
        self.next_group_id = 0
        self.speculate = True
        """Generate a dynamic-sampling batch while the one before is graded (``_worth_speculating``)."""
        self._pass_rates: deque[float] = deque(maxlen=self.PASS_RATE_WINDOW)

    # ------------------------------------------------------------------------------ engine inputs

    def _share_positions(self, num_prompts: int) -> range:
        """Positions in a batch of the prompts this rank's rollout group generates."""
        return range(num_prompts)[share(num_prompts, self.rollout_groups.dp_rank, self.rollout_groups.dp_size)]

    def _prefetch(self, key, make_examples) -> None:
        """Start decoding this rollout group's images of the batch ``make_examples()`` (named ``key``)."""
        if key not in self.prefetcher:
            examples = make_examples()
            self.prefetcher.start(key, examples, self._share_positions(len(examples)))

    def _inputs(self, key, make_examples) -> Prepared:
        """The batch ``key``: from the prefetcher, or built and decoded now."""
        prepared = self.prefetcher.take(key)
        if prepared is None:
            examples = make_examples()
            prepared = Prepared(examples, {p: examples[p].load_images()
                                           for p in self._share_positions(len(examples))})
        return prepared

    def _images(self, prepared: Prepared):
        """``example -> its decoded images``: those ``prepared`` holds, else decoded now."""
        images = {id(prepared.examples[p]): im for p, im in prepared.images.items()}

        def get(example):
            mine = images.get(id(example))
            return mine if mine is not None else example.load_images()
        return get

    def _generate(self, prepared: Prepared, sampling: SamplingParams, views: tuple = (),
                  step: int = 0) -> tuple[RolloutBatch, list[bool]]:
        """``(responses, noisy)`` to the batch (every rank gets them all): ``sampling.n`` per prompt
        on its images, then ``sampling.n`` per extra image ``view`` (a rollout method's, perturbed
        per prompt from ``(rollout.seed, step, row id)``), the prompt's rows contiguous;
        ``request_index`` is the prompt's position. This rank's rollout group makes the requests of
        its share, with the images ``prepared`` holds."""
        images, per = self._images(prepared), 1 + len(views)

        def request(item) -> RolloutRequest:
            example, view = item
            if view is None:
                return RolloutRequest(example.input_ids.tolist(), images(example))
            noisy = perturbed_images(view, example, self.pixel_spec, self.cfg.rollout.seed, step, example.row_id)
            return RolloutRequest(example.input_ids.tolist(),
                                  [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in noisy])

        items = [(e, v) for e in prepared.examples for v in (None, *views)]
        batch = generate_data_parallel(self.engine, items, sampling, self.rollout_groups, request)
        noisy = [i % per != 0 for i in batch.request_index]
        batch.request_index = [i // per for i in batch.request_index]
        return batch, noisy

    def _probe(self, prepared: Prepared, probes, allowed_token_ids) -> list[int]:
        """One greedy token per probe ``(example, continuation ids)`` (``RewardInputs.probe``): the
        example's prompt and images, then the continuation, answered by the engine's current
        weights among ``allowed_token_ids``. Shared over the rollout groups; -1 for an empty answer."""
        images = self._images(prepared)
        sampling = SamplingParams(n=1, max_tokens=1, temperature=0.0, allowed_token_ids=tuple(allowed_token_ids))
        batch = generate_data_parallel(
            self.engine, list(probes), sampling, self.rollout_groups,
            lambda probe: RolloutRequest(probe[0].input_ids.tolist() + list(probe[1]), images(probe[0])))
        return [tokens[0] if tokens else -1 for tokens in batch.response_token_ids]

    def _train_examples(self, indices: list[int]):
        return lambda: [self.train_loader.dataset[i] for i in indices]

    # ---------------------------------------------------------------------------------- grading

    def _submit_grading(self, examples, batch: RolloutBatch) -> PendingGrades:
        """Start grading this rank's share of ``batch`` in the background (collect with ``result()``)."""
        rows = range(len(batch))[self.grader.share(len(batch))]
        texts = self.processor.tokenizer.batch_decode([batch.response_token_ids[r] for r in rows],
                                                      skip_special_tokens=True)
        ex = [examples[batch.request_index[r]] for r in rows]
        return self.grader.submit(texts, [e.answer for e in ex],
                                  [{"row_id": e.row_id, "source": e.source, "problem": e.problem, "parts": e.parts}
                                   for e in ex])

    # ---------------------------------------------------------------------------------- sampling

    def _generate_batch(self, step: int, attempt: int, max_batches: int, take: bool) -> _Generated:
        """Generate the loader's next batch as dynamic-sampling attempt ``attempt``. ``take``: take it
        from the loader (its position moves); else only peek at it (a speculative batch, taken by
        ``_keep`` when it is needed). The images of the batch after it are decoded meanwhile."""
        loader = self.train_loader
        indices = loader.next_indices() if take else loader.peek_indices()
        prepared = self._inputs(("train", tuple(indices)), self._train_examples(indices))
        if attempt + 1 < max_batches:
            after = loader.peek_indices(ahead=0 if take else 1)
            self._prefetch(("train", tuple(after)), self._train_examples(after))
        seed = self.cfg.rollout.seed + (step * 1000 + attempt) * 100003
        sampling = SamplingParams.from_rollout_config(self.cfg.rollout, seed=seed)
        views = tuple(v for m in self.rollout_methods for v in m.generation_views(step, self.cfg.trainer.total_steps))
        return _Generated(indices, prepared, *self._generate(prepared, sampling, views, step))

    def _keep(self, ahead: _Generated) -> _Generated:
        """Take a speculative batch from the loader: it is needed."""
        taken = self.train_loader.next_indices()
        assert taken == ahead.indices, "the loader moved under a speculative batch"
        return ahead

    def _drop(self, ahead: _Generated) -> None:
        """A speculative batch that is not needed: its responses are dropped, the loader never took
        it (it is the next step's first batch), and its decoded images are kept for that batch."""
        self.prefetcher.put_back(("train", tuple(ahead.indices)), ahead.prepared)

    def _worth_speculating(self, kept_groups: int, batch_groups: int) -> bool:
        """Generate the next batch before this one is graded only when it will most likely be needed:
        even at the highest pass rate of the recent batches this one would not fill the step. A wrong
        guess costs a batch of engine time, a missed overlap only the grading time; neither changes
        the result. The rates are the same on every rank (the grades are all-gathered)."""
        rate = max(self._pass_rates, default=1.0)
        return self.speculate and kept_groups + rate * batch_groups < self.cfg.data.rollout_batch_size

    def sample(self, step: int, timer) -> RolloutStep:
        """Rollout batches until ``data.rollout_batch_size`` groups survive dynamic sampling (or
        ``max_batches`` were sampled); keeps a multiple of the data-parallel size of groups.

        Overlapped, with the results of the plain loop (generate, grade, filter, repeat): a batch is
        graded on every rank's share while the engine generates the next one (when that one is worth
        speculating on), and each batch's images are decoded while the one before generates. A batch
        is taken from the loader, and gets its group ids, only once it is known to be needed; its seed
        depends on ``(step, attempt)`` alone. So the batches, seeds, group ids and loader position
        are those of the plain loop, and a resumed run continues exactly."""
        cfg, dyn = self.cfg, self.cfg.algorithm.dynamic_sampling
        max_batches = dyn.max_batches if dyn.enable else 1
        out, tally = RolloutStep(), _Tally()
        current = self._generate_batch(step, 0, max_batches, take=True)
        for attempt in range(max_batches):
            grading = self._submit_grading(current.examples, current.batch)
            ahead = None
            if attempt + 1 < max_batches and self._worth_speculating(len(out.group_order), len(current.examples)):
                ahead = self._generate_batch(step, attempt + 1, max_batches, take=False)
            with timer("reward"):
                results = grading.result()
            self._add_batch(out, tally, current, results, last_chance=attempt == max_batches - 1, step=step,
                            timer=timer)
            if len(out.group_order) >= cfg.data.rollout_batch_size or attempt == max_batches - 1:
                if ahead is not None:
                    self._drop(ahead)
                break
            current = (self._keep(ahead) if ahead is not None
                       else self._generate_batch(step, attempt + 1, max_batches, take=True))
        self._truncate(out, cfg.data.rollout_batch_size)
        if step + 1 < cfg.trainer.total_steps:  # the next step's first batch decodes while this one trains
            first = self.train_loader.peek_indices()
            self._prefetch(("train", tuple(first)), self._train_examples(first))
        self.sleep()  # training next
        out.metrics = tally.metrics(out)
        for method in self.rollout_methods:
            out.metrics.update(method.metrics(step, cfg.trainer.total_steps))
        return out

    def _reward_terms(self, generated: _Generated, results: list, step: int) -> tuple[torch.Tensor, dict]:
        """``([N] sum of the rollout methods' reward terms, their metrics)`` for a graded batch."""
        batch, examples = generated.batch, generated.examples
        total, metrics = torch.zeros(len(batch), device="cpu"), {}
        methods = [m for m in self.rollout_methods if type(m).reward is not RolloutMethod.reward]
        if not methods:
            return total, metrics
        rows_of: dict[int, int] = {}
        keys = []
        for i in batch.request_index:  # a row's key: its index within its prompt's rows
            keys.append(str(rows_of.get(i, 0)))
            rows_of[i] = rows_of.get(i, 0) + 1
        inputs = RewardInputs(
            examples=[examples[i] for i in batch.request_index],
            responses=self.processor.tokenizer.batch_decode(batch.response_token_ids, skip_special_tokens=True),
            accuracy=torch.tensor([r.accuracy for r in results], dtype=torch.float32, device="cpu"),
            format=torch.tensor([r.format for r in results], dtype=torch.float32, device="cpu"),
            keys=keys, seed=self.cfg.rollout.seed, step=step,
            probe=lambda probes, allowed: self._probe(generated.prepared, probes, allowed))
        for method in methods:
            result = method.reward(inputs)
            if result is not None:
                total += result.term
                metrics.update(result.metrics)
        return total, metrics

    def _add_batch(self, out: RolloutStep, tally: _Tally, generated: _Generated, results: list,
                   last_chance: bool, step: int = 0, timer=None) -> None:
        """Give a graded batch its group ids, add the rollout methods' reward terms (timed as
        ``probes``), add it to the tally, and its surviving groups to ``out``. Dynamic sampling keeps
        the groups whose ``algorithm.dynamic_sampling.metric`` (accuracy, or the total reward) varies."""
        cfg, alg = self.cfg, self.cfg.algorithm
        examples, batch = generated.examples, generated.batch
        tally.sampled += 1
        gids = [self.next_group_id + i for i in batch.request_index]
        self.next_group_id += len(examples)
        acc = torch.tensor([r.accuracy for r in results], dtype=torch.float32)
        rewards = torch.tensor([r.total for r in results], dtype=torch.float32)
        lens = torch.tensor(batch.response_lengths)
        if self.rollout_methods:
            with timer("probes") if timer is not None else contextlib.nullcontext():
                terms, term_metrics = self._reward_terms(generated, results, step)
            rewards += terms
            tally.add_method_metrics(term_metrics)
        if alg.overlong.enable:
            rewards += overlong_penalty(lens, cfg.rollout.max_response_length, alg.overlong.buffer_length,
                                        alg.overlong.penalty_factor)
        tally.accuracy += acc.tolist()
        tally.format += [r.format for r in results]
        tally.errors += sum(r.error is not None for r in results)
        tally.timeouts += sum(r.timed_out for r in results)
        tally.lengths += lens.tolist()
        tally.clipped += sum(f == "length" for f in batch.finish_reasons)
        dyn = alg.dynamic_sampling.enable
        signal = rewards if alg.dynamic_sampling.metric == "reward" else acc
        keep = dynamic_sampling_keep(signal, torch.tensor(gids)) if dyn else torch.ones(len(gids), dtype=torch.bool)
        passed = len({gids[r] for r in torch.nonzero(keep).flatten().tolist()})
        tally.passed += passed
        self._pass_rates.append(passed / max(len(examples), 1))
        if last_chance and not out.group_order and not keep.any():
            # Nothing survived any batch: train on this one anyway. Its groups have zero advantage,
            # so the step is a no-op for the policy, but the loop, logs and checkpoints go on.
            logger.warning("dynamic sampling kept no group in %d batches; using the last batch", tally.sampled)
            keep = torch.ones(len(gids), dtype=torch.bool)
        for r in torch.nonzero(keep).flatten().tolist():
            out.prompts.append(examples[batch.request_index[r]])
            out.responses.append(batch.response_token_ids[r])
            out.response_logprobs.append(batch.response_logprobs[r])
            out.group_ids.append(gids[r])
            out.rewards.append(float(rewards[r]))
            out.noisy.append(generated.noisy[r])
            if gids[r] not in out.group_order:
                out.group_order.append(gids[r])

    def _truncate(self, out: RolloutStep, max_groups: int) -> None:
        """Keep at most ``max_groups`` groups, a multiple of the DP size (every rank needs rows)."""
        dp = self.groups.dp_size
        keep = min(len(out.group_order), max_groups) // dp * dp
        if keep == len(out.group_order):
            return
        kept = set(out.group_order[:keep])
        rows = [r for r, g in enumerate(out.group_ids) if g in kept]
        for name in ("prompts", "responses", "response_logprobs", "group_ids", "rewards", "noisy"):
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
        self.engine.update_weights(self.resharder.engine_weights())
        self.engine.wake_up(["kv_cache"])

    def validate(self, val_set) -> dict:
        """Greedy accuracy per validation dataset (``val/accuracy/<name>``) and over all. A chunk is
        graded while the next one generates, and its images decode while the one before generates."""
        sampling = SamplingParams.from_rollout_config(self.cfg.rollout, validation=True, seed=self.cfg.rollout.seed)
        chunks = val_batch_ranges(len(val_set), self.cfg.data.val_batch_size)
        correct: dict[str, list[float]] = {}
        parts: list[tuple[str, list[bool]]] = []
        pending = None
        for k, rows in enumerate(chunks):
            prepared = self._inputs(("val", id(val_set), rows.start), lambda: [val_set[i] for i in rows])
            if k + 1 < len(chunks):
                after = chunks[k + 1]
                self._prefetch(("val", id(val_set), after.start), lambda: [val_set[i] for i in after])
            batch, _ = self._generate(prepared, sampling)
            if pending is not None:
                self._count_correct(correct, *pending)
            pending = (prepared.examples, batch, self._submit_grading(prepared.examples, batch))
            parts += self._grade_parts(prepared.examples, batch)
        if pending is not None:
            self._count_correct(correct, *pending)
        metrics = {f"val/accuracy/{name}": sum(v) / len(v) for name, v in correct.items()}
        every = [a for v in correct.values() for a in v]
        metrics["val/accuracy"] = sum(every) / max(len(every), 1)
        metrics.update(part_accuracy(parts))
        return metrics

    def _grade_parts(self, examples, batch: RolloutBatch) -> list[tuple[str, list[bool]]]:
        """``(dataset, per-position correctness)`` of the batch's multi-part rows (``val/part_accuracy``)."""
        rows = [r for r, i in enumerate(batch.request_index) if examples[i].parts]
        texts = self.processor.tokenizer.batch_decode([batch.response_token_ids[r] for r in rows],
                                                      skip_special_tokens=True)
        return [(examples[batch.request_index[r]].source, grade_parts(t, examples[batch.request_index[r]].parts))
                for r, t in zip(rows, texts)]

    @staticmethod
    def _count_correct(correct: dict, examples, batch: RolloutBatch, grading: PendingGrades) -> None:
        for r, res in zip(batch.request_index, grading.result()):
            correct.setdefault(examples[r].source, []).append(res.accuracy)

    def mismatch_metrics(self, exp, batch: RolloutStep) -> dict:
        """rollout/logprob_mismatch_{mean,max}: engine vs trainer log-probs of the sampled tokens, over
        the rows generated on the images the trainer sees (not NoisyRollout's noisy rows)."""
        clean = torch.tensor([not batch.noisy[r] for r in exp.rows], dtype=torch.bool, device=exp.device)
        mismatch = logprob_mismatch(exp.rollout_logprobs, exp.old_logprobs, exp.response_mask & clean.unsqueeze(-1))
        if self.groups.dp_size > 1:
            mismatch = mismatch.all_reduce(self.groups.dp_group)
        return mismatch.metrics("rollout/")

    def state_dict(self) -> dict:
        return {"loader": self.train_loader.state_dict(), "next_group_id": self.next_group_id}

    def load_state_dict(self, state: dict) -> None:
        self.train_loader.load_state_dict(state["loader"])
        self.next_group_id = state["next_group_id"]
        self.prefetcher.clear()  # decoded for the old position
