"""4 gloo ranks, three dynamic-sampling steps (``rollout_share_worker.py``): each image is decoded and
processed only by the ranks that use it, once per use, and the dataset scan runs once across the
ranks and a restart.

Uses: the two ranks of the rollout group that generates a prompt (its share of the batch: both TP
ranks feed the same requests to their engine shard) and the first pipeline stage of the
data-parallel rank that trains its groups. The engine gets one request per prompt (the ``n``
samples share its image encoding)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from megatron_vgpo.rollout.data_parallel import share
from tests.conftest import run_torchrun
from tests.training.fake_rollout import write_data

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
WORKER = "tests/training/rollout_share_worker.py"
ROLLOUT_GROUP = {0: 0, 1: 0, 2: 1, 3: 1}  # rollout TP2: rank -> rollout group
FIRST_STAGE_OF_DP = {0: 0, 1: 1}  # TP1 x PP2 x DP2: DP rank -> its first-stage rank


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from megatron_vgpo.models.qwen2_5_vl.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("shares")
    model = write_tiny_checkpoint(root / "ckpt")
    data = write_data(root / "data" / "train.parquet", 64)
    out = {}
    for run in ("first", "restart"):
        run_torchrun(WORKER, 4, model, data, root, run, timeout=600)
        out[run] = json.loads((root / f"{run}.json").read_text())
    return out


def test_the_scan_runs_once_across_ranks_and_restarts(runs):
    first, restart = runs["first"], runs["restart"]
    assert [len(r["scanned"]) for r in first] == [1, 0, 0, 0]
    assert [len(r["scanned"]) for r in restart] == [0, 0, 0, 0]
    kept = first[0]["kept"]
    assert len(kept) == 64 and all(r["kept"] == kept for r in first + restart)


def test_each_image_is_processed_only_by_the_ranks_that_use_it(runs):
    ranks = runs["first"]
    steps = ranks[0]["steps"]
    for r in ranks:  # every rank ran the same batches and trained the same step
        assert [s["sampled"] for s in r["steps"]] == [s["sampled"] for s in steps]
    generated = {rank: Counter() for rank in range(4)}
    for k, step in enumerate(steps):
        assert step["sampled"] >= 2, "dynamic sampling never refilled: the test would not cover it"
        for call in range(len(step["calls"])):
            # Both ranks of a rollout group got the same requests, one per prompt; the groups split
            # the batch into its contiguous shares.
            per_group = [ranks[0]["steps"][k]["calls"][call], ranks[2]["steps"][k]["calls"][call]]
            assert ranks[1]["steps"][k]["calls"][call] == per_group[0]
            assert ranks[3]["steps"][k]["calls"][call] == per_group[1]
            batch = per_group[0] + per_group[1]
            assert len(set(batch)) == len(batch) == 4
            assert [len(g) for g in per_group] == [len(range(4)[share(4, g, 2)]) for g in range(2)]
            for rank in range(4):
                generated[rank].update(ranks[rank]["steps"][k]["calls"][call])
    trained = {rank: set() for rank in range(4)}
    for dp, rank in FIRST_STAGE_OF_DP.items():
        trained[rank] = {row for step in ranks[dp]["steps"] for row in step["trained"]}
    for rank, r in enumerate(ranks):
        loads = {(row, kind): n for row, kind, n in r["loads"]}
        # Training: exactly the rows its DP rank trains, on the first stage only, once each.
        assert {row for (row, kind) in loads if kind == "train"} == trained[rank], rank
        # Generation: once per prompt its rollout group generated (a speculative batch that was
        # not needed is the next step's first batch: decoded once, generated twice), plus at most
        # the batch after the run's last one, prefetched while that one generated.
        decoded = {row for (row, kind) in loads if kind == "generate"}
        assert set(generated[rank]) <= decoded, rank
        assert len(decoded - set(generated[rank])) <= len(range(4)[share(4, ROLLOUT_GROUP[rank], 2)]), rank
        assert set(loads.values()) == {1}, (rank, loads)
        # The engine's image processing: once per request (not once per sample), one image each.
        assert r["processed"] == dict(generated[rank]), rank
    # The two rollout groups decoded disjoint shares (a prefetched batch too).
    decoded = [{row for row, kind, _ in r["loads"] if kind == "generate"} for r in ranks]
    assert decoded[0] == decoded[1] and decoded[2] == decoded[3] and not decoded[0] & decoded[2]
