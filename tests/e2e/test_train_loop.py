"""The whole loop for a few steps under torchrun: TP2 x PP2 on 4 CPU processes with vLLM rollouts.

Asserts finite losses, a weight sync into the engine every step, a complete checkpoint named by
``latest``, and the TensorBoard scalars read back from the event files; for VGPO (the default), and
for the other methods of ``methods/`` composed in one run: VPPO, and entropy shaping and VGPO on the
current policy (group-aligned micro-batches) as shapers, PAPO's loss term, each with its diagnostics
and the extra view's time.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vgpo.utils.deps import has

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.distributed, pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not has("vllm"), reason="vLLM is not installed (CPU: pip install -e '.[cpu-rollout]')")]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from megatron_vgpo.data.synthetic import write_synthetic_dataset
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("e2e")
    model = write_tiny_checkpoint(root / "tiny", TinyOptions(seed=0))
    write_synthetic_dataset(root / "data", train=32, val=8, seed=0)
    return root, model


def _train(root: Path, model: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    from megatron_vgpo.distributed.parallel import free_port

    args = [f"model.hf_path={model}", f"data.train_files=[{root / 'data' / 'train.parquet'}]",
            f"data.val_files=[{root / 'data' / 'val.parquet'}]", f"checkpoint.save_dir={root / 'ckpt'}",
            f"logging.tensorboard_dir={root / 'runs'}", "trainer.total_steps=2", "trainer.val_interval=2",
            "trainer.val_before_train=false", "data.rollout_batch_size=2", "trainer.global_batch_size=2",
            "rollout.n=2", "rollout.max_response_length=16", "trainer.micro_batch_size=2",
            "algorithm.dynamic_sampling.max_batches=1", "rollout.kv_cache_memory_bytes=67108864",
            "data.val_batch_size=8", "logging.progress_bar=false", "trainer.format_warmup.steps=2",
            "trainer.format_warmup.batch_size=4", *overrides]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "megatron_vgpo.train", "--config", str(REPO / "examples" / "configs" / "cpu_tiny.yaml"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)


def test_tp2_pp2_loop_with_vllm(tiny_run):
    from megatron_vgpo.training.logging import read_scalars

    root, model = tiny_run
    proc = _train(root, model, 4, "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    scalars = read_scalars(root / "runs" / "cpu_tiny")
    for tag in ("actor/pg_loss", "actor/grad_norm", "actor/lr", "reward/accuracy", "reward/format",
                "response_length/mean", "response_length/max", "response_length/clip_ratio",
                "rollout/logprob_diff_mean", "rollout/logprob_diff_max", "batch/kept_groups",
                "vgpo/rho_mean", "vgpo/late_early_ratio", "vgpo/gate_fraction", "vgpo/psi_std", "vgpo/phi_std",
                "focus/rho_mean", "focus/late_early_ratio",
                "timing_s/rollout", "timing_s/reward", "timing_s/logprob", "timing_s/update",
                "timing_s/weight_sync", "timing_s/step", "perf/tokens_per_s", "val/accuracy"):
        assert tag in scalars, f"{tag} missing from TensorBoard; have {sorted(scalars)}"
    assert [step for step, _ in scalars["actor/pg_loss"]] == [1, 2]
    assert all(math.isfinite(v) for _, v in scalars["actor/pg_loss"] + scalars["actor/grad_norm"])
    assert all(v > 0 for _, v in scalars["timing_s/weight_sync"]), "no weight sync into the engine"
    # The engine runs the trainer's weights: its log-probs of the sampled tokens match the trainer's.
    assert all(v < 1e-3 for _, v in scalars["rollout/logprob_diff_max"]), scalars["rollout/logprob_diff_max"]
    assert (root / "ckpt" / "latest").read_text().strip() == "step_00000002"
    assert (root / "ckpt" / "step_00000002" / "complete.json").exists()
    assert (root / "runs" / "cpu_tiny" / "config.yaml").exists()


OTHER_METHODS = ("algorithm.shapers=[vppo, entropy, vgpo]", "algorithm.loss_terms=[papo]",
                 "algorithm.hidden_states_from=current")
"""Every other shaper and the loss term in one run (one launch: start-up is most of its cost): VPPO on
pi_old, entropy shaping and VGPO on the current policy (group-aligned micro-batches; the config wants
current-policy shapers last), and PAPO's masked view."""
OTHER_TAGS = ("entropy/token_entropy", "entropy/bonus", "papo/kl", "papo/entropy", "papo/entropy_aug",
              "vppo/kept_fraction", "vppo/alpha_min", "vppo/alpha_max", "vppo/sample_entropy", "vgpo/rho_mean",
              "vgpo/phi_std", "timing_s/extra_views")


def test_tp2_pp2_loop_with_the_other_methods_composed(tiny_run, tmp_path):
    from megatron_vgpo.training.logging import read_scalars

    root, model = tiny_run
    run = tmp_path / "run"
    proc = _train(root, model, 4, "parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2",
                  f"checkpoint.save_dir={run / 'ckpt'}", f"logging.tensorboard_dir={run / 'runs'}",
                  "trainer.format_warmup.steps=0", "trainer.val_interval=0", *OTHER_METHODS)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    scalars = read_scalars(run / "runs" / "cpu_tiny")
    for tag in OTHER_TAGS:
        assert tag in scalars, f"{tag} missing from TensorBoard; have {sorted(scalars)}"
        assert all(math.isfinite(v) for _, v in scalars[tag]), (tag, scalars[tag])
    assert [step for step, _ in scalars["actor/pg_loss"]] == [1, 2]
    assert all(math.isfinite(v) for _, v in scalars["actor/pg_loss"] + scalars["actor/grad_norm"])
    assert all(v < 1e-3 for _, v in scalars["rollout/logprob_diff_max"])
