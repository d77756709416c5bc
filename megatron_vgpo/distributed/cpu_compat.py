"""Everything that makes megatron-core (0.16, 0.17) run without CUDA, in one place.

Megatron-Core assumes CUDA. On a machine without it (CI, laptops, the CPU quickstart; a CPU build of
torch, or a CUDA build with no GPU) we apply the patches below, and only there:
``apply_cpu_compat()`` does nothing when ``torch.cuda.is_available()``.
It is idempotent and cheap; ``parallel.init_parallel`` and the model builders call it.

Patches, each with why:

1. A CPU stand-in for ``torch`` inside ``megatron.core`` modules only. Megatron allocates with
   ``device=torch.cuda.current_device()`` about a hundred times, writes ``device="cuda"`` literals in
   the pipeline schedules (``total_num_tokens``), the default causal mask
   (``transformer/utils.get_default_causal_mask``), the optimizer and grad clipping, and calls
   ``torch.cuda.synchronize()`` in p2p communication, ``parallel_state`` and checkpointing, plus
   ``torch.cuda.nvtx`` / ``Event`` / ``Stream`` here and there. Rewriting those functions would copy
   Megatron code and break on the next release, so instead each loaded ``megatron.core.*`` module's
   global ``torch`` is replaced by ``_CpuTorch``: it forwards every attribute to the real ``torch``,
   except (a) tensor factories, whose CUDA ``device`` becomes ``"cpu"`` (and ``pin_memory`` False),
   and (b) ``torch.cuda``, a namespace whose ``current_device()`` is ``"cpu"``, whose
   ``synchronize`` / ``empty_cache`` / ``nvtx`` do nothing, whose RNG functions act on the CPU
   generator (the "device" generator on CPU), and which forwards the rest to the real
   ``torch.cuda``. The real ``torch`` module, and every other library (transformers, vLLM), are left
   untouched. Megatron modules imported after the call are patched by the next call; the call
   imports the modules training, checkpoint save and load use first (``_EAGER_IMPORTS``) so that
   one call is enough. Beyond the sub-packages, the modules that takes, by megatron-core version:

   - 0.16.x: ``dist_checkpointing.strategies.torch``, which ``dist_checkpointing`` imports only at
     the first save or load, and with it ``filesystem_async`` (``torch.cuda.synchronize()`` in
     ``preload_tensors``) and ``state_dict_saver`` (``torch.cuda.current_device()`` for the
     failure broadcast); ``strategies.fully_parallel`` and its ``exchange_utils``
     (``torch.cuda.synchronize()``, ``device="cuda"``, ``.cuda()`` in the fully parallel load).
   - 0.17.x: the same modules; here ``strategies.torch`` imports ``filesystem_async`` and
     ``state_dict_saver`` inside the save call, and ``serialization.save`` ``fully_parallel``, so
     they must be named one by one.

   Patches 2-4 target the same functions, with the same signatures, in both versions.
   ``tests/distributed/test_cpu_compat.py`` saves and loads a checkpoint and then checks that no
   loaded Megatron module that mentions CUDA still sees the real ``torch``.
2. The RNG tracker (``tensor_parallel.random``): ``CudaRNGStatesTracker`` saves and restores the
   generator state through ``_get_cuda_rng_state`` / ``_set_cuda_rng_state``; the latter goes through
   ``torch.cuda._lazy_call``, which on CPU-only torch queues the callback forever, so ``fork()``
   would silently not switch states. Both functions are replaced by CPU-generator versions, so
   ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()`` (weight init and
   dropout in TP regions) keep their meaning with the CPU generator. (As on GPU, where it seeds
   the device generator, ``model_parallel_cuda_manual_seed(seed)`` therefore seeds torch's global
   CPU generator with ``seed``.)
3. ``LanguageModule.setup_embeddings_and_output_layer`` moves the pipeline-tied output weight with
   ``weight.data.cuda()`` before the first/last-stage all-reduce; it runs with ``Tensor.cuda`` as the
   identity for the duration of that call only.
4. ``optimizer.clip_grads.clip_grad_by_total_norm_fp32`` asserts every gradient is a
   ``torch.cuda.FloatTensor``; the optimizer's gradient clipping goes through a CPU version of it
   (same signature and arithmetic: grads scaled in place by ``max_norm / (total_norm + 1e-6)`` when
   that is below 1). The norm itself (``get_grad_norm_fp32``, all-reduced over the model-parallel
   groups, TP duplicates counted once) is Megatron's own.

Facts measured with megatron-core 0.16.1 on CPU/gloo (not patched; the callers must respect them):
- virtual pipeline with ``batch_p2p_comm=True`` (the default) gives silently wrong losses on gloo:
  use ``batch_p2p_comm=False`` (``cpu_model_parallel_overrides`` below returns it);
- varying sequence lengths across micro-batches need ``variable_seq_lengths=True``, which 0.16 only
  accepts together with ``moe_token_dispatcher_type="alltoall"``;
- the pipeline schedule divides the loss returned by the loss function in place;
- ``dist_checkpointing`` needs ``psutil``, and a script that saves needs an
  ``if __name__ == "__main__":`` guard (it spawns a process);
- THD (packed) sequences need Transformer-Engine: not available with the local spec;
- ``DistributedOptimizer`` needs CUDA: use Megatron's plain optimizer on CPU;
- no ``gradient_accumulation_fusion`` / fused kernels (they need apex or TE).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import types

import torch

_REAL_TORCH = torch
_APPLIED_TO: set[str] = set()  # names of megatron modules already patched
_ONCE_DONE = False

# Modules imported before patching so that they see the CPU stand-in: the sub-packages training
# uses, then the checkpoint modules that Megatron imports only inside a save or load call (patch 1
# lists them per version); each exists in 0.16 and 0.17.
_EAGER_IMPORTS = (
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.transformer",
    "megatron.core.models.gpt",
    "megatron.core.pipeline_parallel",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
)

_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
    "randperm", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "eye", "linspace", "empty_strided",
)


def _cpu_device(device):
    """Map any CUDA device spec (``"cuda"``, ``"cuda:1"``, an int, a torch.device) to ``"cpu"``."""
    if device is None:
        return None
    if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
        return "cpu"
    if isinstance(device, _REAL_TORCH.device) and device.type == "cuda":
        return "cpu"
    return device


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False  # pinning needs a CUDA context
        return fn(*args, **kwargs)
    return wrapper


class _Noop:
    """Stands in for CUDA events, streams and nvtx ranges: every call and attribute is harmless."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Noop()

    def __getattr__(self, name):
        return _Noop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _noop(*args, **kwargs):
    return None


class _CpuCuda(types.ModuleType):
    """``torch.cuda`` as seen by Megatron modules on a CPU-only machine (patch 1)."""

    def __init__(self):
        super().__init__("torch.cuda")
        self.current_device = lambda: "cpu"
        self.synchronize = _noop
        self.empty_cache = _noop
        self.is_available = lambda: False
        self.device_count = lambda: 0
        self.get_rng_state = lambda device=None: _REAL_TORCH.get_rng_state()
        self.set_rng_state = lambda state, device=None: _REAL_TORCH.set_rng_state(state)
        self.manual_seed = lambda seed: _REAL_TORCH.manual_seed(seed)
        self.manual_seed_all = lambda seed: _REAL_TORCH.manual_seed(seed)
        self.random = types.SimpleNamespace(get_rng_state=self.get_rng_state, set_rng_state=self.set_rng_state)
        self.nvtx = _Noop()
        self.Event = _Noop
        self.Stream = _Noop
        self.current_stream = _Noop
        self.stream = lambda *a, **k: contextlib.nullcontext()
        self.memory_allocated = lambda *a, **k: 0
        self.max_memory_allocated = lambda *a, **k: 0

    def __getattr__(self, name):
        return getattr(_REAL_TORCH.cuda, name)


class _CpuTorch(types.ModuleType):
    """``torch`` as seen by Megatron modules on a CPU-only machine (patch 1)."""

    def __init__(self):
        super().__init__("torch")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(_REAL_TORCH, name)))

    def __getattr__(self, name):
        return getattr(_REAL_TORCH, name)


_CPU_TORCH = _CpuTorch()


def _patch_megatron_modules() -> None:
    for name, module in list(sys.modules.items()):
        if name in _APPLIED_TO or not name.startswith("megatron.core") or module is None:
            continue
        if getattr(module, "torch", None) is _REAL_TORCH:
            module.torch = _CPU_TORCH
        _APPLIED_TO.add(name)


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda device=None, clone=False, graph_safe=False: _REAL_TORCH.get_rng_state()
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: _REAL_TORCH.set_rng_state(new_state)


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    original = _REAL_TORCH.Tensor.cuda
    _REAL_TORCH.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        _REAL_TORCH.Tensor.cuda = original


def _patch_tied_embedding_setup() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.setup_embeddings_and_output_layer
    if getattr(original, "_cpu_compat", False):
        return

    @functools.wraps(original)
    def setup(self, *args, **kwargs):
        with _tensor_cuda_is_identity():
            return original(self, *args, **kwargs)

    setup._cpu_compat = True
    LanguageModule.setup_embeddings_and_output_layer = setup


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Patch 4: Megatron's ``clip_grad_by_total_norm_fp32`` without its CUDA-only assertion."""
    if isinstance(parameters, _REAL_TORCH.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        _REAL_TORCH._foreach_mul_(grads, clip_coeff)


def _patch_grad_clipping() -> None:
    from megatron.core.optimizer import clip_grads, optimizer

    clip_grads.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_cpu


def cpu_compat_needed() -> bool:
    return not torch.cuda.is_available()


def apply_cpu_compat() -> bool:
    """Apply the CPU patches when CUDA is absent; returns whether they are active. Idempotent."""
    global _ONCE_DONE
    if not cpu_compat_needed():
        return False
    if not _ONCE_DONE:
        for name in _EAGER_IMPORTS:
            importlib.import_module(name)
        _patch_rng_tracker()
        _patch_tied_embedding_setup()
        _patch_grad_clipping()
        _ONCE_DONE = True
    _patch_megatron_modules()  # again each call: picks up megatron modules imported since
    return True


def cpu_model_parallel_overrides() -> dict:
    """``ModelParallelConfig`` / ``TransformerConfig`` fields a CPU run must set (see the docstring)."""
    if not cpu_compat_needed():
        return {}
    return dict(
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        batch_p2p_comm=False,  # True gives wrong results with virtual pipeline on gloo
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
    )
