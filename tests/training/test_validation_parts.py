"""Validation on the multi-part task reports each part position's accuracy (``val/part_accuracy/<file>/<k>``)
besides the total's: an engine whose responses read the first parts right and the last one wrong
gives exactly that, per file."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from megatron_vgpo.rollout.types import RolloutBatch
from tests.training.fake_rollout import FakeEngine, config


class ScriptedEngine(FakeEngine):
    """Answers the k-th request it gets with ``script(examples[k])``'s text (validation asks in dataset
    order; prompts alone do not identify a row: rows share questions, blank rows share images)."""

    def __init__(self, examples, tokenizer, script):
        super().__init__()
        self.queue = list(examples)
        self.tokenizer, self.script = tokenizer, script

    def generate(self, requests, sampling) -> RolloutBatch:
        out = RolloutBatch([], [], [], [], [])
        for i, request in enumerate(requests):
            example = self.queue.pop(0)
            assert request.prompt_token_ids == example.input_ids.tolist()
            tokens = self.tokenizer.encode(self.script(example), add_special_tokens=False)
            for _ in range(sampling.n):
                out.request_index.append(i)
                out.prompt_token_ids.append(list(request.prompt_token_ids))
                out.response_token_ids.append(tokens)
                out.response_logprobs.append([0.0] * len(tokens))
                out.finish_reasons.append("stop")
        return out


def validate(tmp_path, script, *overrides) -> dict:
    """Validation metrics of ``Rollouts.validate`` on a small multicount set, the engine answering
    with ``script(example)``."""
    from megatron_vgpo.data import PromptDataLoader, PromptDataset
    from megatron_vgpo.data.synthetic import MulticountOptions, write_synthetic_dataset
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor, write_tiny_checkpoint
    from megatron_vgpo.rewards import RewardScorer
    from megatron_vgpo.rollout.data_parallel import RolloutGroups
    from megatron_vgpo.training.rollout import Rollouts

    processor = load_processor(write_tiny_checkpoint(tmp_path / "ckpt"))
    paths = write_synthetic_dataset(tmp_path / "data", train=6, val=6, seed=0, opts=MulticountOptions())
    cfg = config("reward.custom_fn=", "data.val_batch_size=4", *overrides)
    val = PromptDataset([str(paths["val"]), str(paths["val_blank"])], cfg.data, processor, 1024)
    train = PromptDataset([str(paths["train"])], cfg.data, processor, 1024)
    examples = [val[i] for i in range(len(val))]
    assert all(len(e.parts) == 3 for e in examples)
    engine = ScriptedEngine(examples, processor.tokenizer, script)
    rollouts = Rollouts(cfg, engine, None, processor, PromptDataLoader(train, 2, False, 0),
                        RewardScorer(dataclasses.replace(cfg.reward, num_workers=0)), SimpleNamespace(dp_size=1),
                        RolloutGroups.from_world(0, 1, 1))
    return rollouts.validate(val)


def test_validation_reports_accuracy_per_part_position(tmp_path):
    from megatron_vgpo.rewards.parts import structured_response

    def script(example):  # parts 1 and 2 right, part 3 off by one: the total is wrong
        counts = [p.count for p in example.parts]
        return structured_response([p.name for p in example.parts], counts[:2] + [counts[2] + 1])

    metrics = validate(tmp_path, script)
    for name in ("val", "val_blank"):
        assert metrics[f"val/accuracy/{name}"] == 0.0
        assert [metrics[f"val/part_accuracy/{name}/{k}"] for k in (1, 2, 3)] == [1.0, 1.0, 0.0]


def test_parts_must_sum_reaches_the_grader_through_the_rollouts(tmp_path):
    """The right total boxed after a first read one too high: correct on the total alone; with
    ``reward.parts_must_sum`` the rollouts pass each row's parts to the scorer and it is wrong."""
    from megatron_vgpo.rewards.parts import structured_response

    def script(example):
        counts = [p.count for p in example.parts]
        text = structured_response([p.name for p in example.parts], [counts[0] + 1] + counts[1:])
        return text.replace(f"\\boxed{{{sum(counts) + 1}}}", f"\\boxed{{{sum(counts)}}}")

    for must_sum, accuracy in ((False, 1.0), (True, 0.0)):
        metrics = validate(tmp_path / str(must_sum), script, f"reward.parts_must_sum={str(must_sum).lower()}")
        assert metrics["val/accuracy"] == accuracy, must_sum
        assert [metrics[f"val/part_accuracy/val/{k}"] for k in (1, 2, 3)] == [0.0, 1.0, 1.0]
