"""Grading spread over the ranks (``rewards/distributed.py``): the same results as one scorer, each
rank grading its contiguous share; pools sized to the node."""

from __future__ import annotations

import dataclasses
import json

import pytest

from megatron_vgpo.config.schema import RewardConfig
from megatron_vgpo.rewards import RewardScorer
from megatron_vgpo.rewards.distributed import DistributedGrader, node_num_workers, rank_scorer
from megatron_vgpo.rollout.data_parallel import share
from tests.conftest import run_torchrun

CUSTOM = "tests.rewards.grading_fns:score"


@pytest.mark.distributed
@pytest.mark.slow
def test_four_ranks_grade_like_rank_zero_alone(tmp_path):
    run_torchrun("tests/rewards/grading_worker.py", 4, tmp_path, "check", timeout=300)
    report = json.loads((tmp_path / "check.json").read_text())
    assert [b["n"] for b in report] == [37, 3, 0]
    for b in report:
        assert b["spread"] == b["alone"]
        # Each rank graded its contiguous share, in its own pool.
        assert b["graded_by"] == [float(rank) for rank in range(4) for _ in range(b["n"])[share(b["n"], rank, 4)]]
    assert any(r["accuracy"] == 1.0 for r in report[0]["spread"]) and any(r["accuracy"] == 0.0
                                                                           for r in report[0]["spread"])


def test_a_world_of_one_grades_everything_in_the_background():
    cfg = RewardConfig(custom_fn=CUSTOM, num_workers=0, format_weight=0.5)
    responses, truths = [f"answer {i}" for i in range(9)], [str(i % 3) for i in range(9)]
    with RewardScorer(cfg) as reference:
        expected = reference.score(responses, truths)
    grader = DistributedGrader(RewardScorer(cfg))
    assert grader.share(9) == slice(0, 9)
    pending = grader.submit(responses, truths)
    assert pending.result() == expected
    grader.close()


def test_pool_size_follows_the_node(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert node_num_workers() == 4  # 64 CPUs, 8 ranks: half the CPUs, 4 workers per rank
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert node_num_workers() == 1
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert node_num_workers() == 32


def test_rank_scorer_sizes_the_pool_unless_told_not_to(monkeypatch):
    monkeypatch.setattr("megatron_vgpo.rewards.distributed.node_num_workers", lambda: 3)
    sizes = []
    monkeypatch.setattr("megatron_vgpo.rewards.distributed.RewardScorer",
                        lambda cfg: sizes.append(cfg.num_workers))
    rank_scorer(RewardConfig(num_workers=2))
    rank_scorer(dataclasses.replace(RewardConfig(num_workers=2), auto_workers=False))
    assert sizes == [3, 2]
