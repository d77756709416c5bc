"""``tools/verify_parity.py`` under torchrun: Megatron == HF for each layout, tied and untied.

Float32 on CPU/gloo; every launch checks both tiny checkpoints (untied and tied embeddings) on the
fixed mixed batch (two image sizes, two images in one sample, a text-only row, right padding, two
micro-batches of different lengths) and the tool exits non-zero above 1e-5. The TP2 x PP2 launch also
checks the project's own tiny checkpoint (``tools/make_tiny_qwen25vl.py``): sharded safetensors with an
index, an odd vocabulary (1025, padded for TP=2), each stage reading its share.
"""

from __future__ import annotations

import importlib.util
import re

import pytest

from tests.conftest import REPO, run_torchrun

TOOL = REPO / "tools" / "verify_parity.py"
LAYOUTS = {  # name: (processes, tool arguments); TP1 x PP1 runs in this process (see below)
    "tp2": (2, ["--tp", 2, "--pp", 1]),
    "pp2": (2, ["--tp", 1, "--pp", 2]),
    "tp2xpp2": (4, ["--tp", 2, "--pp", 2]),
    "pp2xvpp2": (2, ["--tp", 1, "--pp", 2, "--vpp", 2]),
}
MCORE_LAYOUTS = ("tp2xpp2", "pp2xvpp2")
"""Run on both megatron-core versions in CI (marker ``mcore``): between them TP, PP and virtual PP."""
RESULT = re.compile(r"max\|dlogprob\|=(\S+) max\|dhidden\|=(\S+) .* (PASS|FAIL)")


def check_results(output: str, expected: int = 2) -> None:
    results = RESULT.findall(output)
    print("\n".join(line for line in output.splitlines() if line.startswith("[verify_parity]")))
    assert len(results) == expected, output[-3000:]
    for dlogprob, dhidden, verdict in results:
        assert verdict == "PASS" and float(dlogprob) <= 1e-5 and float(dhidden) <= 1e-5


@pytest.fixture(scope="module")
def make_tiny_dir(tmp_path_factory):
    """The project's tiny checkpoint, sharded (200 KB shards), with its odd vocabulary."""
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("make_tiny") / "tiny",
                                 TinyOptions(max_shard_size="200KB", init_std=0.1))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.mcore) if name in MCORE_LAYOUTS else name
                                    for name in LAYOUTS])
def test_verify_parity(layout, tiny_hf_dirs, request):
    nproc, args = LAYOUTS[layout]
    dirs = [tiny_hf_dirs["untied"], tiny_hf_dirs["tied"]]
    if layout == "tp2xpp2":  # the make-tiny checkpoint in the same 4-process launch (start-up is most of it)
        dirs.append(request.getfixturevalue("make_tiny_dir"))
    output = run_torchrun(TOOL, nproc, *args, "--tol", "1e-5", "--hf-dir", *dirs)
    check_results(output, expected=len(dirs))
    assert all(f"[verify_parity] {d} |" in output for d in dirs), output[-3000:]


def test_verify_parity_world_of_one(tiny_hf_dirs, capsys):
    """TP1 x PP1: the tool's ``main`` in this process (without torchrun it starts a world of one)."""
    spec = importlib.util.spec_from_file_location("verify_parity", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--hf-dir", str(tiny_hf_dirs["untied"]), str(tiny_hf_dirs["tied"])]) == 0
    check_results(capsys.readouterr().out)
