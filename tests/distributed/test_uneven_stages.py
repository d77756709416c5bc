"""Uneven pipeline stages (``parallel.first_stage_layers`` / ``last_stage_layers``) on the tiny model:
everything keyed on layer ownership still holds.

One torchrun launch (``uneven_worker.py``, PP 2 on 2 gloo ranks, both tiny checkpoints) runs the
splits 1 + 3 (Megatron's ``num_layers_in_first_pipeline_stage``) and 3 + 1 (``..._last_...``), then
the even split and PP 1: HF parity, the weight resharder's stream, gradients equal to TP1 x PP1, and
Megatron checkpoints saved under one split loaded under the others (the layer axis is global).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from tests.conftest import run_torchrun
from tests.distributed.grad_worker import full_gradients
from tests.distributed.test_gradients import as_hf

WORKER = Path(__file__).with_name("uneven_worker.py")
UNEVEN = {"first1": [[0], [1, 2, 3]], "last1": [[0, 1, 2], [3]]}
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def uneven_run(tiny_hf_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("uneven")
    output = run_torchrun(WORKER, 2, "--out", out, *(f"{k}={v}" for k, v in tiny_hf_dirs.items()), timeout=900)
    print("\n".join(line for line in output.splitlines() if line.startswith("[uneven]")))
    return out, output


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_each_stage_builds_its_share_of_global_layers(uneven_run, kind):
    _, output = uneven_run
    layers = dict(re.findall(rf"\[uneven\] {kind} (\w+) layers (.+)", output))
    assert layers == {**{k: str(v) for k, v in UNEVEN.items()}, "even": "[[0, 1], [2, 3]]"}, output[-3000:]


@pytest.mark.parametrize("kind", ["untied", "tied"])
@pytest.mark.parametrize("phase", list(UNEVEN))
def test_hf_parity_and_resharder_stream_under_an_uneven_split(uneven_run, kind, phase):
    _, output = uneven_run
    found = re.search(rf"\[uneven\] {kind} {phase} parity max\|dlogprob\|=(\S+) max\|dhidden\|=(\S+)", output)
    assert found, output[-3000:]
    assert float(found[1]) <= 1e-5 and float(found[2]) <= 1e-5
    assert f"[uneven] {kind} {phase} resharder stream exact=True" in output


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_checkpoints_load_across_splits_and_pp_sizes(uneven_run, kind):
    _, output = uneven_run
    loads = re.findall(rf"\[uneven\] {kind} checkpoint (\w+) -> (\w+): (\d+) of (\d+) parameters differ", output)
    pairs = {(saved, into) for saved, into, _, _ in loads}
    assert pairs == {("first1", "last1"), ("first1", "even"), ("last1", "even"),
                     ("first1", "pp1"), ("last1", "pp1"), ("even", "pp1")}, output[-3000:]
    assert all(bad == "0" and int(total) > 0 for *_, bad, total in loads), loads


@pytest.mark.parametrize("kind", ["untied", "tied"])
def test_gradients_under_an_uneven_split_equal_tp1_pp1(uneven_run, tiny_hf_dirs, world_of_one, kind):
    out, _ = uneven_run
    hf_dir = tiny_hf_dirs[kind]
    hf_config = AutoConfig.from_pretrained(hf_dir)
    ref = as_hf(full_gradients(hf_dir, world_of_one)[0], hf_config, 1)
    for phase in UNEVEN:
        merged = {}
        for path in sorted((out / kind).glob(f"grads_{phase}_pp*.pt")):
            for name, grad in torch.load(path).items():  # the tied embedding: both stages' contributions
                merged[name] = merged[name] + grad if name in merged else grad
        got = as_hf(merged, hf_config, 1)
        assert got.keys() == ref.keys(), phase
        worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
        assert worst <= 1e-5, (phase, worst)
