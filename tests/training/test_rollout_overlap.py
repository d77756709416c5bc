"""The overlapped sampling loop (every batch graded while the engine generates the next one, images
decoded ahead in a background thread) gives exactly the plain loop's steps: same batches, seeds,
group ids, rewards and loader position; a speculative batch that is not needed takes nothing from
the loader, and its decoded images serve the next step; a resumed run continues exactly."""

from __future__ import annotations

import dataclasses
import threading
from collections import Counter
from types import SimpleNamespace

import pytest

from megatron_vgpo.data import PromptDataLoader, PromptDataset
from megatron_vgpo.rewards import RewardScorer
from megatron_vgpo.rollout.data_parallel import RolloutGroups
from megatron_vgpo.rollout.types import RolloutRequest, SamplingParams
from megatron_vgpo.training.logging import StepTimer
from megatron_vgpo.training.rollout import Rollouts
from tests.training.fake_rollout import FakeEngine, comparable, config, write_data
from tests.training.hash_reward import reward

STEPS = 6


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("overlap")
    processor = load_processor(write_tiny_checkpoint(root / "ckpt"))
    cfg = config(f"trainer.total_steps={STEPS}")
    dataset = PromptDataset([str(write_data(root / "data" / "train.parquet", 100))], cfg.data, processor,
                            cfg.rollout.max_prompt_length)
    return cfg, processor, dataset


def make(setup, speculate: bool = True, state: dict | None = None) -> tuple[Rollouts, FakeEngine]:
    cfg, processor, dataset = setup
    loader = PromptDataLoader(dataset, cfg.data.rollout_batch_size, cfg.data.shuffle, cfg.data.seed)
    engine = FakeEngine()
    scorer = RewardScorer(dataclasses.replace(cfg.reward, num_workers=0))  # in-process: no worker start-up
    rollouts = Rollouts(cfg, engine, None, processor, loader, scorer, SimpleNamespace(dp_size=1),
                        RolloutGroups.from_world(0, 1, 1))
    rollouts.speculate = speculate
    if state is not None:
        rollouts.load_state_dict(state)
    return rollouts, engine


def run(rollouts: Rollouts, steps: range) -> list:
    return [(comparable(rollouts.sample(step, StepTimer(synchronize=False))), rollouts.state_dict())
            for step in steps]


def plain_first_batch(setup) -> list[int]:
    cfg, _, dataset = setup
    return PromptDataLoader(dataset, cfg.data.rollout_batch_size, cfg.data.shuffle, cfg.data.seed).peek_indices()


def counted(rollouts: Rollouts, name: str, counter: Counter) -> None:
    method = getattr(rollouts, name)

    def wrapper(*args):
        counter[name] += 1
        return method(*args)

    setattr(rollouts, name, wrapper)


@pytest.fixture(scope="module")
def plain(setup):
    rollouts, engine = make(setup, speculate=False)
    steps = run(rollouts, range(STEPS))
    assert sum(step["metrics"]["batch/sampled_batches"] for step, _ in steps) == len(engine.calls)
    return steps


@pytest.mark.parametrize("always", [False, True], ids=["speculate_when_likely", "speculate_always"])
def test_overlapped_loop_equals_the_plain_loop(setup, plain, monkeypatch, always):
    loads: Counter = Counter()
    load_images = PromptDataset.load_images

    def counting(self, i, raw=False):
        loads[self[i].row_id, threading.current_thread().name.startswith("vgpo-prefetch")] += 1
        return load_images(self, i, raw)

    monkeypatch.setattr(PromptDataset, "load_images", counting)
    rollouts, engine = make(setup)
    if always:  # both outcomes of a speculation, many times
        rollouts._worth_speculating = lambda kept_groups, batch_groups: True
    speculation: Counter = Counter()
    counted(rollouts, "_keep", speculation)
    counted(rollouts, "_drop", speculation)
    assert run(rollouts, range(STEPS)) == plain
    if always:
        assert speculation["_keep"] >= 1 and speculation["_drop"] >= 1, speculation
    assert len(engine.calls) == sum(step["metrics"]["batch/sampled_batches"] for step, _ in plain) + speculation["_drop"]
    # Every generated prompt's images were decoded once, a dropped batch's included (it is the
    # next step's first batch), all but the run's first batch's in the background. The only other
    # decode: the batch after the last one, prefetched while the last step's last batch generated.
    dataset = setup[2]
    generated = {dataset[i].row_id for i in range(len(dataset)) if tuple(dataset[i].input_ids.tolist())
                 in {p for call in engine.calls for p in call}}
    assert set(loads.values()) == {1}, loads
    decoded = {row for row, _ in loads}
    assert generated <= decoded
    assert decoded - generated <= {dataset[i].row_id for i in rollouts.train_loader.peek_indices()}
    assert [row for row, background in loads if not background] == [dataset[i].row_id for i in plain_first_batch(setup)]


def test_speculation_only_when_the_next_batch_is_likely_needed(setup):
    rollouts, _ = make(setup)
    target = rollouts.cfg.data.rollout_batch_size  # 4 groups
    assert not rollouts._worth_speculating(0, 4)  # no pass rate seen yet: this batch might fill the step
    rollouts._pass_rates.extend([0.25, 0.5])
    assert rollouts._worth_speculating(0, 4) and rollouts._worth_speculating(1, 4)  # 0 + 2, 1 + 2 < 4
    assert not rollouts._worth_speculating(2, 4)
    rollouts._pass_rates.append(1.0)
    assert not rollouts._worth_speculating(0, target)
    rollouts.speculate = False
    rollouts._pass_rates.extend([0.0] * Rollouts.PASS_RATE_WINDOW)  # 1.0 leaves the window
    assert not rollouts._worth_speculating(0, 4)
    rollouts.speculate = True
    assert rollouts._worth_speculating(0, 4)


def test_resume_continues_exactly(setup, plain):
    stop = 2
    rollouts, _ = make(setup, state=plain[stop][1])
    assert run(rollouts, range(stop + 1, STEPS)) == plain[stop + 1:]


def test_validation_overlapped_equals_chunk_by_chunk_grading(setup):
    cfg, processor, dataset = setup
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, val_batch_size=3))
    rollouts, _ = make((cfg, processor, dataset))
    val = [dataset[i] for i in range(10)]
    metrics = rollouts.validate(dataset if len(dataset) == 10 else _Subset(dataset, 10))
    sampling = SamplingParams.from_rollout_config(cfg.rollout, validation=True, seed=cfg.rollout.seed)
    engine, accuracies = FakeEngine(), []
    for start in range(0, 10, 3):
        chunk = val[start:start + 3]
        batch = engine.generate([RolloutRequest(ex.input_ids.tolist(), ex.load_images()) for ex in chunk], sampling)
        texts = processor.tokenizer.batch_decode(batch.response_token_ids, skip_special_tokens=True)
        accuracies += [reward(t, chunk[r].answer, {}) for t, r in zip(texts, batch.request_index)]
    assert metrics["val/accuracy"] == pytest.approx(sum(accuracies) / len(accuracies))
    assert metrics["val/accuracy/train"] == metrics["val/accuracy"]


class _Subset:
    """The first ``n`` examples of a dataset (a validation set of 10 rows: 4 chunks of 3, 3, 3, 1)."""

    def __init__(self, dataset, n):
        self.dataset, self.n = dataset, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.dataset[i]
