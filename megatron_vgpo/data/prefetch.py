"""Decode a batch's images ahead of use, in one background thread.

A rollout group's ranks need their share of a batch's images, decoded and resized, before the
engine can generate; done in line, the devices wait for it at every batch. ``ImagePrefetcher.start``
decodes them while the engine generates the batch before (or while the trainer trains on the last
step); ``take`` hands them over, waiting only for a decode still running. Nothing is drawn from a
data loader here: the caller names the batch (its key and examples) and decides when to take it.

Only the images are prepared in the thread. The caller builds the examples (tokenisation) in its own
thread, because a Hugging Face fast tokenizer must not be used from two threads at once; PIL
releases the GIL while it decodes and resamples, so the thread takes little from the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Hashable, Optional, Sequence

from PIL import Image

from megatron_vgpo.data.dataset import PromptExample


@dataclass
class Prepared:
    """A batch's examples and the decoded images of some of them."""

    examples: list[PromptExample]
    images: dict[int, list[Image.Image]]
    """Position in ``examples`` -> that example's images (``load_images()``), for the positions asked for."""


def _decode(examples: Sequence[PromptExample]) -> list[list[Image.Image]]:
    return [ex.load_images() for ex in examples]


class ImagePrefetcher:
    """Background image decoding of batches named by a key; at most ``capacity`` batches held."""

    def __init__(self, capacity: int = 4):
        self.capacity = capacity
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vgpo-prefetch")
        self._pending: OrderedDict[Hashable, tuple[list, list[int], Future]] = OrderedDict()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._pending

    def start(self, key: Hashable, examples: list[PromptExample], positions: Sequence[int]) -> None:
        """Decode the images of ``examples[p]`` for ``p`` in ``positions`` in the background (nothing
        if ``key`` is held already). The oldest batch is dropped beyond ``capacity``."""
        if key in self._pending:
            return
        positions = list(positions)
        self._hold(key, examples, positions, self._executor.submit(_decode, [examples[p] for p in positions]))

    def put_back(self, key: Hashable, prepared: Prepared) -> None:
        """Hold a taken batch again (it was not used after all; the next taker gets it as it is)."""
        future: Future = Future()
        future.set_result(list(prepared.images.values()))
        self._hold(key, prepared.examples, list(prepared.images), future)

    def take(self, key: Hashable) -> Optional[Prepared]:
        """The batch held under ``key`` (waiting for its decode; a decode error is raised here), or None."""
        entry = self._pending.pop(key, None)
        if entry is None:
            return None
        examples, positions, future = entry
        return Prepared(examples, dict(zip(positions, future.result())))

    def clear(self) -> None:
        """Drop every held batch (decodes not started are cancelled)."""
        for _, _, future in self._pending.values():
            future.cancel()
        self._pending.clear()

    def close(self) -> None:
        self.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _hold(self, key: Hashable, examples: list, positions: list[int], future: Future) -> None:
        self._pending[key] = (examples, positions, future)
        while len(self._pending) > self.capacity:
            _, (_, _, oldest) = self._pending.popitem(last=False)
            oldest.cancel()
