"""``tools/gpu_check.py``: its dry run and its ``--device cpu`` run as a user starts them (subprocesses),
and, in process, the code paths the CPU run skips (bf16 parity with the accuracy ratio, the memory,
MFU and distributed-optimizer checks) so that the first GPU run does not meet them untried."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from megatron_vgpo.utils.gpu_check_checks import (
    TINY, TOLERANCES, WIDE_7B, Check, CheckFailed, Runner, parity_metrics, predicted_update_memory, violations,
)
from tests.conftest import REPO

TOOL = REPO / "tools" / "gpu_check.py"
CUDA_ONLY = {"tiny/parity_fp32", "tiny/parity_te", "tiny/distributed_optimizer", "wide/parity_te",
             "wide/distributed_optimizer", "wide/memory", "wide/mfu"}


def run_tool(*args: str, timeout: int) -> tuple[int, dict, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout; stderr:\n{proc.stderr[-4000:]}"
    return proc.returncode, json.loads(lines[-1]), proc.stderr


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_plans_the_checks_and_names_what_is_missing():
    rc, out, err = run_tool("--dry-run", timeout=300)
    assert rc == 0, err[-3000:]
    assert out["mode"] == "dry-run" and out["device"] == "cuda" and out["dtype"] == "bfloat16"
    env = out["environment"]
    assert {"python", "torch", "cuda_available", "megatron_core", "optional"} <= env.keys()
    assert set(env["optional"]) == {"transformer_engine", "flash_attn", "apex", "vllm"}
    if not torch.cuda.is_available():
        assert "CUDA device" in out["missing"]
    if not env["optional"]["transformer_engine"]:
        assert any(m.startswith("transformer_engine") for m in out["missing"])
    wide = out["policies"]["wide"]
    assert (wide["text"]["hidden_size"], wide["text"]["num_hidden_layers"], wide["text"]["vocab_size"]) == (
        3584, 2, 152064)
    assert wide["vision"]["hidden_size"] == 1280 and wide["vision"]["fullatt_block_indexes"] == [1]
    assert wide["update_batch"] == "2 rows x 2048 tokens, one shared 448x448 image"
    assert 20 < wide["predicted_update_peak_gib"] < wide["predicted_with_reserve_gib"] < 80
    assert out["policies"]["tiny"]["parity_batch"][0] == 3
    names = [c["name"] for c in out["checks"]]
    assert names[0] == "tiny/reference" and {"tiny/checkpoint", "wide/memory", "wide/mfu"} <= set(names)
    assert all(c["what"] for c in out["checks"])


@pytest.mark.slow
def test_cpu_run_passes_every_check_and_skips_the_cuda_only_ones_with_reasons(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("--device cpu refuses a machine with a visible GPU")
    rc, out, err = run_tool("--device", "cpu", "--out", str(tmp_path / "summary.json"), timeout=600)
    assert rc == 0, json.dumps(out, indent=1)[-6000:]
    assert json.loads((tmp_path / "summary.json").read_text()) == out
    assert out["ok"] and out["failed"] == [] and out["dtype"] == "float32"
    records = {r["name"]: r for r in out["checks"]}
    assert {n for n, r in records.items() if r["ok"] is None} == CUDA_ONLY
    assert all(records[n]["skipped"] for n in CUDA_ONLY)
    assert all(r["ok"] is True for n, r in records.items() if n not in CUDA_ONLY)
    assert records["tiny/parity_local"]["hidden_rel_fro"] < 1e-5
    assert records["wide/ppo_update"]["tokens"] == 2 * 256 and records["wide/ppo_update"]["grad_norm"] > 0
    assert records["tiny/checkpoint"]["optimizer_tensors"] > 0 and not records["tiny/checkpoint"]["model_mismatches"]


def test_runner_isolates_failures_and_skips_what_depends_on_them():
    def boom():
        raise ValueError("broken")

    def missed():
        raise CheckFailed("bound missed", {"value": 2.0})

    checks = [Check("a", boom, ""), Check("b", lambda: {"x": 1}, "", needs=("a",)),
              Check("c", missed, ""), Check("d", lambda: {"y": 1}, "", needs=("c",)),
              Check("e", lambda: {}, "", skip="CUDA only")]
    records = {r["name"]: r for r in Runner(budget_s=60, log=lambda _: None).run(checks)}
    assert records["a"]["ok"] is False and "ValueError: broken" in records["a"]["error"]
    assert records["b"]["ok"] is None and "needs a" in records["b"]["skipped"]
    assert records["c"] == {"name": "c", "ok": False, "value": 2.0, "error": "bound missed",
                            "seconds": records["c"]["seconds"]}
    assert records["d"]["ok"] is True  # a missed bound still leaves its state for the next check
    assert records["e"] == {"name": "e", "ok": None, "seconds": 0.0, "skipped": "CUDA only"}
    late = Runner(budget_s=-1, log=lambda _: None).run([Check("f", lambda: {}, "")])
    assert late[0]["ok"] is None and "time budget" in late[0]["skipped"]


def test_metrics_and_bounds():
    h = torch.randn(2, 5, 8)
    lp = torch.randn(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    same = parity_metrics(lp, h, lp, h, mask, mask)
    assert same["logprob_max_abs"] == 0 and same["hidden_rel_fro"] == 0 and same["hidden_cos_min"] > 0.9999
    assert violations(same, TOLERANCES["float32"]) == []
    broken = violations({**same, "hidden_rel_fro": math.nan, "hidden_cos_min": 0.5}, TOLERANCES["bfloat16"])
    assert len(broken) == 2 and broken[0].startswith("hidden_rel_fro=nan")


def test_cuda_without_a_gpu_is_an_environment_error(tool, monkeypatch, capsys):
    env = {"python": "3", "torch": torch.__version__, "torch_cuda": None, "cuda_available": False,
           "megatron_core": "0.16.1", "transformers": "5", "optional": dict.fromkeys(
               ("transformer_engine", "flash_attn", "apex", "vllm"), False)}
    monkeypatch.setattr(tool, "environment", lambda: env)
    assert tool.main(["--policies", "tiny"]) == 2
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not out["ok"] and "CUDA device" in out["error"]
    with pytest.raises(SystemExit) as exit_info:
        tool.parse_args(["--policies", "huge"])
    assert exit_info.value.code == 2


def test_memory_and_mfu_checks_on_recorded_measurements(tool, monkeypatch):
    """The two CUDA-only checks only read what ``ppo_update`` recorded: fed by hand here."""
    session = object.__new__(tool.Session)
    session.cuda = True
    config = WIDE_7B.hf_config()
    predicted = predicted_update_memory(WIDE_7B, config, flash=False, bf16=True).total_without(*tool.ENGINE_ITEMS)
    update = dict(tokens=4096, seq_len=2048.0, logprob_s=0.05, update_s=0.2, peak_bytes=int(1.1 * predicted))
    session.policies = {"wide": SimpleNamespace(hf_config=config, update=update, layer_spec="local")}
    record = session.memory(WIDE_7B)
    assert record["ratio"] == pytest.approx(1.1, rel=1e-3) and record["predicted_items_gib"]["logits"] > 1
    update["peak_bytes"] = 2 * predicted
    with pytest.raises(CheckFailed, match="outside"):
        session.memory(WIDE_7B)

    import megatron_vgpo.training.logging as metrics_logging

    monkeypatch.setattr(metrics_logging, "device_peak_flops", lambda name=None: 989e12)
    record = session.mfu(WIDE_7B)
    n = record["num_params"]
    assert n == 1_641_598_064  # the HF model's parameters (embedding and LM head included, as perf/mfu counts)
    forward = 4096 * (2 * n + 4 * 2 * 3584 * 2048) / (0.05 * 989e12)
    assert record["logprob_mfu"] == pytest.approx(forward, rel=1e-5)
    assert record["update_mfu"] == pytest.approx(3 * forward * 0.05 / 0.2, rel=1e-5)


@pytest.fixture(scope="module")
def cpu_session(tool, tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("a CPU session on a machine with a GPU is refused")
    from megatron_vgpo.distributed import destroy_parallel

    session = tool.Session("cpu", tmp_path_factory.mktemp("gpu_check"))
    yield session
    session.policies.clear()
    destroy_parallel()


def test_bf16_parity_with_the_accuracy_ratio_on_cpu(cpu_session):
    """The GPU run's bf16 comparison (reference in both dtypes, noise floor, accuracy ratio), on the
    CPU's bf16 kernels: the bounds hold with room to spare."""
    cpu_session.dtype = "bfloat16"
    try:
        floor = cpu_session.reference(TINY)["bf16_noise_floor"]
        record = cpu_session.parity(TINY, "local", "bfloat16")
    finally:
        cpu_session.dtype = "float32"
    assert 1e-3 < floor["hidden_rel_fro"] < TOLERANCES["bfloat16"].hidden_rel_fro
    assert record["hidden_rel_fro"] < TOLERANCES["bfloat16"].hidden_rel_fro / 2
    assert record["accuracy_ratio"]["hidden_rel_fro"] < 1.5 and record["accuracy_ratio"]["logprob_mean_abs"] < 1.5


def test_distributed_optimizer_check_names_the_plain_optimizer_on_cpu(cpu_session):
    cpu_session.reference(TINY)
    cpu_session.parity(TINY, "local", "float32")
    cpu_session.focus_scores(TINY)
    with pytest.raises(CheckFailed) as failed:
        cpu_session.distributed_optimizer(TINY)
    record = failed.value.measurements
    assert record["optimizers"] and "DistributedOptimizer" not in record["optimizers"]
    assert record["params_outside_ddp_buffer"]  # no contiguous param buffer without it
