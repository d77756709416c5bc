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


def test_the_hook_is_cheap_and_removes_itself():
    out = run("import sys, megatron_vgpo; from megatron_vgpo.utils import torchvision_shim as s; "
              "print('torch' in sys.modules, s._HOOK in sys.meta_path); "
              "import importlib.util; importlib.util.find_spec('torchvision'); print(s._HOOK in sys.meta_path)")
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True", "False"]


def test_a_torchaudio_built_for_another_torch_is_treated_as_absent():
    out = run("import sys, megatron_vgpo; from megatron_vgpo.utils import torchvision_shim as s; "
              "import transformers.processing_utils; "
              "print(s._installed_version('torch') is not None, 'torchaudio' in sys.modules and sys.modules['torchaudio'] is None)")
    assert out.returncode == 0, out.stderr[-3000:]  # transformers' processors import (a broken torchaudio breaks them)
    found_torch, hidden = out.stdout.split()
    assert found_torch == "True"
    from importlib import metadata

    try:
        version, torch_version = metadata.version("torchaudio"), metadata.version("torch")
    except metadata.PackageNotFoundError:
        version = torch_version = None
    mismatched = version is not None and version.split(".")[:2] != torch_version.split("+")[0].split(".")[:2]
    assert hidden == str(mismatched)
