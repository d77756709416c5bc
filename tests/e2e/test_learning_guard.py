"""The project still learns (issue 10's learning guard): a shortened CPU run of the quickstart's setup
(the tiny random Qwen2.5-VL of std 0.1, vLLM rollouts, the format warm-up, validation with its
blank-image control) on an easier split of the counting task, for DAPO and for VGPO. Each run's
validation accuracy must rise by ``MARGIN`` over its step-0 value, and the blank-image control must
not: what is learned is read from the image.

The split: one object that fills the 56-pixel image, present or not ("How many red circles?" -> 0 or
1, balanced, chance 1/2), so that every image token carries the answer; the quickstart's own task (up
to 3 of 4 cells, a distractor) leaves chance only after 75-150 steps, far too many for CI. 40 warm-up
steps, then 50 RL steps of 8 prompts x 8 responses at lr 2e-3 (the quickstart: 16 x 8 at 5e-4), with
validation at steps 0 and 50. The two runs train at once, one core each. Measured on the 2-core
machine: README, "Learning guard".
"""

from __future__ import annotations

import sys
import time

import pytest

from megatron_vgpo.utils.deps import has
from tests.e2e.loop import CONFIG, kill_run, start_train, train_env

pytestmark = [pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not has("vllm"), reason="vLLM is not installed (CPU: pip install -e '.[cpu-rollout]')")]

METHODS = ("dapo", "vgpo")
STEPS = 50
MARGIN = 0.25
"""Validation accuracy at the last step >= step 0's + MARGIN (chance is 0.5: 0.5 -> >= 0.75)."""
BLANK_MAX_RISE = 0.1
"""The blank-image control may rise by no more than this: its labels are those of the original images."""
OVERRIDES = (f"trainer.total_steps={STEPS}", f"trainer.val_interval={STEPS}", "trainer.format_warmup.steps=40",
             "optimizer.lr=2.0e-3", "data.rollout_batch_size=8", "trainer.global_batch_size=8",
             "trainer.micro_batch_size=8", "checkpoint.save_interval=0", "logging.progress_bar=false",
             "logging.run_name=guard")
TIMEOUT_S = 1500


@pytest.fixture(scope="module")
def guard_runs(tmp_path_factory) -> dict:
    """Both methods trained at once from the same model and data: method -> (val, blank) accuracy by step."""
    from megatron_vgpo.data.synthetic import SyntheticOptions, write_synthetic_dataset
    from megatron_vgpo.methods import PRESETS
    from megatron_vgpo.models.qwen2_5_vl.tiny import TinyOptions, write_tiny_checkpoint
    from megatron_vgpo.training.logging import read_scalars

    root = tmp_path_factory.mktemp("learning_guard")
    model = write_tiny_checkpoint(root / "tiny", TinyOptions(seed=0, init_std=0.1))
    data = write_synthetic_dataset(root / "data", train=1024, val=64, seed=0,
                                   opts=SyntheticOptions(size=56, cell=56, max_count=1, max_distractors=0))
    procs = {}
    for method in METHODS:
        out = root / method
        cmd = [sys.executable, "-m", "megatron_vgpo.train", "--config", str(CONFIG), f"model.hf_path={model}",
               f"data.train_files=[{data['train']}]", f"data.val_files=[{data['val']}, {data['val_blank']}]",
               f"logging.tensorboard_dir={out / 'runs'}", f"checkpoint.save_dir={out / 'ckpt'}",
               *OVERRIDES, *PRESETS[method]]
        procs[method] = start_train(cmd, root / f"{method}.log", train_env())  # one thread each
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(2)
    finally:
        late = [m for m, p in procs.items() if p.poll() is None]
        for method in late:
            kill_run(procs[method])
    results = {}
    for method, proc in procs.items():
        log = (root / f"{method}.log").read_text()
        assert method not in late, f"{method}: not finished in {TIMEOUT_S} s:\n{log[-6000:]}"
        assert proc.returncode == 0, f"{method} exited {proc.returncode}:\n{log[-6000:]}"
        scalars = read_scalars(root / method / "runs" / "guard")
        results[method] = (dict(scalars["val/accuracy/val"]), dict(scalars["val/accuracy/val_blank"]))
    return results


@pytest.mark.timeout(TIMEOUT_S + 300)
@pytest.mark.parametrize("method", METHODS)
def test_validation_accuracy_rises_over_its_start(guard_runs, method):
    val, blank = guard_runs[method]
    assert sorted(val) == [0, STEPS], val
    print(f"{method}: validation {val[0]:.3f} -> {val[STEPS]:.3f}, blank {blank[0]:.3f} -> {blank[STEPS]:.3f}")
    assert val[STEPS] >= val[0] + MARGIN, f"{method} did not learn: validation {val[0]:.3f} -> {val[STEPS]:.3f}"
    assert blank[STEPS] <= blank[0] + BLANK_MAX_RISE, f"{method}: the blank control rose {blank[0]} -> {blank[STEPS]}"
