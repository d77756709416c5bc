"""RewardScorer: batch results, format weighting, and misbehaving graders (hang, raise, crash) that
score 0 with a logged reason while the rest of the batch is graded."""

import importlib.util
import logging
import sys
import time
import types

import pytest

from megatron_vgpo.config.schema import RewardConfig
from megatron_vgpo.rewards import CustomRewardError, RewardScorer, RewardWorkerError, summarize

CUSTOM = "tests.rewards.custom_fns:reward"
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def custom_scorer():
    with RewardScorer(RewardConfig(custom_fn=CUSTOM, timeout_s=TIMEOUT, num_workers=2)) as scorer:
        scorer.score(["warm"], ["warm"])  # wait for the workers to start: start-up is not grading time
        yield scorer


def test_hanging_reward_times_out_and_the_rest_is_graded(custom_scorer):
    responses = ["a", "b", "c", "d", "e", "f"]
    truths = ["a", "hang", "c", "x", "e", "f"]
    start = time.monotonic()
    results = custom_scorer.score(responses, truths, [{"row_id": f"r{i}"} for i in range(6)])
    elapsed = time.monotonic() - start
    assert elapsed < TIMEOUT + 2.0, elapsed
    assert [r.accuracy for r in results] == [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert results[1].error.startswith("timed out after 1 s") and results[1].total == 0.0
    assert all(r.error is None for i, r in enumerate(results) if i != 1)
    replaced = custom_scorer._pool.replaced
    assert replaced >= 1
    # The hung worker was replaced: the pool keeps working at full size.
    assert [r.accuracy for r in custom_scorer.score(["a", "b"], ["a", "b"])] == [1.0, 1.0]
    assert all(w.proc.poll() is None for w in custom_scorer._pool._workers)


def test_raising_exiting_and_crashing_rewards_score_zero_and_are_logged(custom_scorer, caplog):
    truths = ["raise", "ok", "exit", "crash", "nan", "text", "nodict"]
    with caplog.at_level(logging.WARNING, logger="megatron_vgpo.rewards"):
        results = custom_scorer.score(["ok"] * len(truths), truths, [{"row_id": f"row{i}"} for i in range(len(truths))])
    assert [r.accuracy for r in results] == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    errors = [r.error for r in results]
    assert errors[0] == "ValueError: cannot grade row row0" and errors[1] is None
    assert errors[2] == "SystemExit: 3"
    assert errors[3].startswith("grading worker died")
    assert "non-finite" in errors[4] and "TypeError" in errors[5] and "without 'accuracy'" in errors[6]
    logged = " ".join(r.getMessage() for r in caplog.records)
    for i in (0, 2, 3, 4, 5, 6):
        assert f"row{i}" in logged
    assert "row1" not in logged


def test_custom_dict_result_and_format_weight():
    cfg = RewardConfig(custom_fn=CUSTOM, format_weight=0.2, num_workers=0)
    with RewardScorer(cfg) as scorer:
        dict_result, plain = scorer.score(["<think>t</think> x", "<think>t</think>\\boxed{1}"], ["dict", "zzz"])
    assert (dict_result.accuracy, dict_result.format, dict_result.extra) == (0.5, 1.0, {"length": 18.0})
    assert dict_result.total == pytest.approx(0.8 * 0.5 + 0.2 * 1.0)
    assert (plain.accuracy, plain.format, plain.total) == (0.0, 1.0, pytest.approx(0.2))


def test_builtin_grader_in_workers_with_format():
    responses = ["<think>two reds</think> \\boxed{\\frac{1}{2}}", "\\boxed{3}", "<think>hm</think> 3",
                 "\\boxed{2} \\boxed{4}"]
    truths = ["0.5", "3", "3", "2"]
    with RewardScorer(RewardConfig(format_weight=0.5, num_workers=1)) as scorer:
        results = scorer.score(responses, truths)
    assert [(r.accuracy, r.format, r.total) for r in results] == [(1.0, 1.0, 1.0), (1.0, 0.0, 0.5), (0.0, 0.0, 0.0),
                                                                    (0.0, 0.0, 0.0)]
    metrics = summarize(results)
    assert metrics["reward/accuracy"] == 0.5 and metrics["reward/format"] == 0.25 and metrics["reward/error_rate"] == 0


@pytest.mark.skipif(importlib.util.find_spec("math_verify") is None, reason="math-verify is optional and not installed")
def test_math_verify_hang_is_stopped_by_the_pool():
    """A real hang: math-verify (its own alarm off) never finishes on this tower of powers."""
    with RewardScorer(RewardConfig(grader="math_verify", timeout_s=TIMEOUT, num_workers=1)) as scorer:
        scorer.score(["\\boxed{1}"], ["1"])
        start = time.monotonic()
        hung, ok = scorer.score(["\\boxed{10^{10^{10^{10}}}}", "\\boxed{\\frac{2}{4}}"], ["1", "\\frac{1}{2}"])
        # The hang is infinite: the bound proves the pool stopped it. It includes restarting the only
        # worker, which re-imports sympy: over 4 s on a loaded 2-core machine.
        assert time.monotonic() - start < TIMEOUT + 20.0
    assert hung.error.startswith("timed out") and hung.accuracy == 0.0
    assert ok.accuracy == 1.0 and ok.error is None


@pytest.mark.parametrize("spec,match", [
    ("no_colon", "expected 'module:function'"),
    ("no_such_module_xyz:reward", "cannot import module 'no_such_module_xyz'"),
    ("tests.rewards.custom_fns:missing", "has no attribute 'missing'"),
    ("tests.rewards.custom_fns:NOT_A_FUNCTION", "is a int, not a function"),
    ("/nonexistent/reward.py:reward", "file not found"),
])
def test_custom_fn_loading_errors_are_named(spec, match):
    with pytest.raises(CustomRewardError, match=match):
        RewardScorer(RewardConfig(custom_fn=spec, num_workers=1))


def test_custom_fn_from_a_file_path(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text("def score(response, ground_truth, info):\n    return float(ground_truth in response)\n")
    with RewardScorer(RewardConfig(custom_fn=f"{path}:score", num_workers=1)) as scorer:
        assert [r.accuracy for r in scorer.score(["the answer is 4", "5"], ["4", "4"])] == [1.0, 0.0]


def test_a_function_the_workers_cannot_import_is_a_named_error(monkeypatch):
    module = types.ModuleType("_only_in_the_parent")
    module.reward = lambda response, ground_truth, info: 1.0
    monkeypatch.setitem(sys.modules, "_only_in_the_parent", module)
    scorer = RewardScorer(RewardConfig(custom_fn="_only_in_the_parent:reward", num_workers=1))
    with pytest.raises(RewardWorkerError, match="cannot import module '_only_in_the_parent'"):
        scorer.score(["x"], ["y"])
    scorer.close()


def test_infos_reach_the_function_and_lengths_are_checked():
    with RewardScorer(RewardConfig(custom_fn="tests.rewards.custom_fns:echo_info", num_workers=0)) as scorer:
        assert scorer.score(["r"], ["g"], [{"row_id": "abcd"}])[0].extra == {"row_len": 4.0}
        with pytest.raises(ValueError, match="2 responses, 1 ground truths"):
            scorer.score(["a", "b"], ["a"])


def test_close_stops_the_workers():
    scorer = RewardScorer(RewardConfig(num_workers=2))
    procs = [w.proc for w in scorer._pool._workers]
    scorer.close()
    assert all(p.poll() is not None for p in procs)


def test_a_worker_killed_from_outside_is_replaced(custom_scorer):
    victim = custom_scorer._pool._workers[0].proc
    victim.kill()
    victim.wait()
    results = custom_scorer.score(["a", "b", "c"], ["a", "b", "x"])
    assert [r.accuracy for r in results] == [1.0, 1.0, 0.0] and all(r.error is None for r in results)


def test_parts_must_sum_needs_the_total_to_be_the_sum_of_the_reads():
    """Hand cases: a right total whose reads sum to it; a right total with reads that do not; a wrong
    total; a row without parts (unaffected); the same batch with the option off (the total alone)."""
    parts = [{"name": "red circles", "count": 1}, {"name": "blue squares", "count": 0},
             {"name": "green triangles", "count": 1}]
    responses = ["<think> red circles 1. blue squares 0. green triangles 1. </think> \\boxed{2}",
                 "<think> red circles 0. blue squares 0. green triangles 1. </think> \\boxed{2}",
                 "<think> red circles 1. blue squares 0. green triangles 1. </think> \\boxed{3}",
                 "<think> red circles 1. blue squares 1. </think> \\boxed{2}",
                 "<think> two </think> \\boxed{2}"]
    infos = [{"parts": parts}] * 4 + [{"parts": None}]
    truths = ["2", "2", "2", "2", "2"]
    for must_sum, expected in ((True, [1.0, 0.0, 0.0, 0.0, 1.0]), (False, [1.0, 1.0, 0.0, 1.0, 1.0])):
        scorer = RewardScorer(RewardConfig(num_workers=0, parts_must_sum=must_sum, format_weight=0.5))
        results = scorer.score(responses, truths, infos)
        assert [r.accuracy for r in results] == expected, must_sum
        assert [r.total for r in results] == [0.5 * a + 0.5 for a in expected]  # the format reward is kept
