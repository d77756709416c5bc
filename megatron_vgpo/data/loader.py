"""Batches of ``PromptExample``s: a resumable, deterministically shuffled training loader and the
validation batches.

Training order: epoch ``e`` is a permutation of the dataset drawn from ``(seed, e)`` alone, so the
order never depends on how the run was interrupted; a batch never straddles two epochs (the last
``len % batch_size`` examples of a shuffled epoch are left out, different ones each epoch). The
position is ``(epoch, index)``, ``index`` counting examples already served in that epoch; the trainer
checkpoints ``state_dict()`` and a resumed loader continues with exactly the next batch. Dynamic
sampling just calls ``next_batch()`` again. ``peek_indices()`` names the next batch without taking it
(the rollout prepares, or speculatively generates, a batch before it knows it will use it): only
what ``next_indices()`` took counts in the position.
"""

from __future__ import annotations

import random
from typing import Iterator

from megatron_vgpo.config.schema import DataConfig
from megatron_vgpo.data.dataset import PromptDataset, PromptExample
from megatron_vgpo.data.sources import DatasetError


class PromptDataLoader:
    """Endless training batches of ``batch_size`` examples, epoch after epoch."""

    def __init__(self, dataset: PromptDataset, batch_size: int, shuffle: bool, seed: int):
        if not 0 < batch_size <= len(dataset):
            raise DatasetError(f"rollout batch size {batch_size} must be in [1, {len(dataset)}] "
                               f"(the number of usable training examples)")
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed
        self.epoch, self.index = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            # A string seed is hashed with SHA-512 by `random`: stable across Python versions/platforms.
            random.Random(f"megatron_vgpo-data/{self.seed}/{epoch}").shuffle(order)
        return order

    def next_indices(self) -> list[int]:
        """Dataset indices of the next batch (advances the position)."""
        if self.index + self.batch_size > len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order(self.epoch)
        batch = self._order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return batch

    def peek_indices(self, ahead: int = 0) -> list[int]:
        """Dataset indices of the batch that ``next_indices()`` returns after ``ahead`` more calls;
        the position does not move."""
        epoch, index, order = self.epoch, self.index, self._order
        for _ in range(ahead + 1):
            if index + self.batch_size > len(order):
                epoch, index = epoch + 1, 0
                order = self._epoch_order(epoch)
            batch = order[index:index + self.batch_size]
            index += self.batch_size
        return batch

    def next_batch(self) -> list[PromptExample]:
        return [self.dataset[i] for i in self.next_indices()]

    def __iter__(self) -> Iterator[list[PromptExample]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_examples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        same_data = state.get("num_examples", len(self.dataset)) == len(self.dataset)
        if not same_data or state.get("seed", self.seed) != self.seed:
            raise DatasetError(
                f"data loader state was saved for {state.get('num_examples')} examples with seed "
                f"{state.get('seed')}; this run has {len(self.dataset)} examples with seed {self.seed}: "
                f"the resumed order would differ")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._epoch_order(self.epoch)


def val_batch_ranges(num_examples: int, batch_size: int) -> list[range]:
    """The dataset indices of each validation batch: file order, ``batch_size`` at a time (-1: all at once)."""
    size = num_examples if batch_size == -1 else batch_size
    if size < 1:
        raise DatasetError(f"validation batch size must be >= 1 or -1, got {batch_size}")
    return [range(start, min(start + size, num_examples)) for start in range(0, num_examples, size)]


def iter_val_batches(dataset: PromptDataset, batch_size: int) -> Iterator[list[PromptExample]]:
    """The validation set in file order, ``batch_size`` examples at a time (-1: all at once).
    Each example's ``source`` names its file, for per-dataset accuracy."""
    for rows in val_batch_ranges(len(dataset), batch_size):
        yield [dataset[i] for i in rows]


def build_train_loader(cfg: DataConfig, processor, max_prompt_length: int) -> PromptDataLoader:
    """The training loader of ``cfg.train_files``, batches of ``cfg.rollout_batch_size`` prompts."""
    dataset = PromptDataset(cfg.train_files, cfg, processor, max_prompt_length)
    return PromptDataLoader(dataset, cfg.rollout_batch_size, cfg.shuffle, cfg.seed)


def build_val_dataset(cfg: DataConfig, processor, max_prompt_length: int) -> PromptDataset | None:
    """The validation set of ``cfg.val_files`` (None when there are none); ``dataset.names`` lists the
    per-file dataset names that validation accuracy is reported under."""
    if not cfg.val_files:
        return None
    return PromptDataset(cfg.val_files, cfg, processor, max_prompt_length)
