"""The ``RolloutEngine`` protocol: what the training loop needs from a generation backend.

The trainer only ever talks to this interface (NeMo-RL's ``GenerationInterface`` is the model):
generate responses for typed requests, take new weights after each update, give memory back while
the trainer runs, drop caches that the old weights produced. ``vllm_engine.VLLMRolloutEngine`` is
the implementation; a test double only has to provide these methods.

Lifecycle of one RL step, colocated (engine and trainer share the devices)::

    engine.wake_up()                     # weights + KV cache back on the device (no-op on CPU)
    batch = engine.generate(requests, sampling)
    engine.sleep(level=2)                # free the KV cache and discard the weights for training
    ... log-probs, advantages, update ...
    empty the allocator cache
    engine.wake_up(["weights"]); engine.update_weights(resharded()); engine.wake_up(["kv_cache"])
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

from megatron_vgpo.rollout.types import NamedTensors, RolloutBatch, RolloutRequest, SamplingParams


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> RolloutBatch:
        """Responses for ``requests`` (``sampling.n`` each), prompt-major, in request order."""
        ...

    def update_weights(self, weights: NamedTensors) -> None:
        """Load new weights in place from ``(hf_name, full tensor)`` pairs, consumed lazily (so a
        generator can stream buckets), then reset every cache computed with the old weights (prefix
        KV cache, encoder outputs, multimodal cache). Names not given keep their current values."""
        ...

    def reset_caches(self) -> None:
        """Drop the prefix cache and the encoder / multimodal caches."""
        ...

    def sleep(self, level: int = 1) -> None:
        """Free device memory for training: level 1 frees the KV cache and offloads weights to host
        memory, level 2 discards weights too (they must be reloaded). No-op where unsupported."""
        ...

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Re-allocate what ``sleep`` freed (``tags``: "weights" and/or "kv_cache"; None: all)."""
        ...

    def shutdown(self) -> None:
        """Release the engine; it cannot be used afterwards."""
        ...
