"""``MetricSums``: every reduction by hand, NaNs left out of means, merging, and the reduction over two
gloo ranks equal to the pooled single-process values."""

import math
from pathlib import Path

import pytest
import torch

from megatron_vgpo.methods.metrics import MetricSums
from tests.conftest import run_torchrun
from tests.methods.dp_scope_worker import fill_metrics

T = torch.tensor
WORKER = Path(__file__).with_name("dp_scope_worker.py")


def test_reductions_by_hand():
    m = MetricSums()
    x = T([1.0, 2.0, 4.0, 5.0])
    m.mean("mean", x)  # (1 + 2 + 4 + 5) / 4 = 3
    m.std("std", x)  # population: sqrt(((-2)^2 + 1 + 1 + 2^2) / 4) = sqrt(10 / 4) = 1.58113883
    m.ratio("ratio", T([1.0, 0.0, 1.0]), T([1.0, 1.0, 1.0, 1.0]))  # 2 / 4
    m.min("min", x)
    m.max("max", T([[3.0, -7.0], [9.5, 0.0]]))  # any shape
    out = m.reduce()
    assert out == pytest.approx({"mean": 3.0, "std": math.sqrt(2.5), "ratio": 0.5, "min": 1.0, "max": 9.5})


def test_nan_left_out_of_means():
    m = MetricSums()
    m.mean("late_early", T([2.0, float("nan"), 4.0]))  # (2 + 4) / 2 = 3, not nan, not 6 / 3
    m.mean("all_nan", T([float("nan")]))  # nothing to average: nan
    m.mean("empty", torch.zeros(0))
    out = m.reduce()
    assert out["late_early"] == pytest.approx(3.0)
    assert math.isnan(out["all_nan"]) and math.isnan(out["empty"])


def test_extrema_of_nothing_are_nan():
    m = MetricSums()
    m.min("min", torch.zeros(0))
    m.max("max", torch.zeros(0))
    out = m.reduce()
    assert math.isnan(out["min"]) and math.isnan(out["max"])


def test_repeated_names_and_update_pool_the_elements():
    # The same name twice pools the elements (not an average of averages):
    #   mean([1, 2, 3] + [10]) = 16 / 4 = 4 (the mean of the two means would be 6)
    #   std([1, 2, 3, 10]): E[x^2] = (1 + 4 + 9 + 100) / 4 = 28.5, mean^2 = 16 -> sqrt(12.5)
    #   ratio (1 + 1) / (2 + 4) = 1/3; min(1, 10) = 1; max(3, 10) = 10
    a, b = MetricSums(), MetricSums()
    for part, vals, num, den in ((a, T([1.0, 2.0, 3.0]), T([1.0]), T([2.0])), (b, T([10.0]), T([1.0]), T([4.0]))):
        part.mean("mean", vals)
        part.std("std", vals)
        part.ratio("ratio", num, den)
        part.min("min", vals)
        part.max("max", vals)
    b.mean("only_b", T([7.0]))
    merged = MetricSums().update(a).update(b)
    expected = {"mean": 4.0, "std": math.sqrt(12.5), "ratio": 1 / 3, "min": 1.0, "max": 10.0, "only_b": 7.0}
    assert merged.reduce() == pytest.approx(expected)
    # the parts themselves are unchanged by the merge
    assert a.reduce()["mean"] == pytest.approx(2.0) and b.reduce()["mean"] == pytest.approx(10.0)
    # and recording twice under one name equals the merge
    same = MetricSums()
    same.mean("mean", T([1.0, 2.0, 3.0]))
    same.mean("mean", T([10.0]))
    assert same.reduce()["mean"] == pytest.approx(4.0)


def test_detached_inputs_and_no_grad_kept():
    x = T([1.0, 3.0], requires_grad=True)
    m = MetricSums()
    m.mean("m", x * 2)
    m.min("lo", x)
    assert not any(p.requires_grad for _, parts in m.sums.values() for p in parts)
    assert m.reduce() == pytest.approx({"m": 4.0, "lo": 1.0})


def _values(seed=0, n=11):
    g = torch.Generator().manual_seed(seed)
    with_nan = torch.randn(n, generator=g)
    with_nan[[1, 4]] = float("nan")
    return {"x": torch.randn(n, generator=g) * 3 + 1, "num": (torch.rand(n, generator=g) > 0.5).float(),
            "den": torch.ones(n), "with_nan": with_nan}


def test_pooled_values_match_numpy_style_formulas():
    v = _values()
    out = fill_metrics(v).reduce()
    x = v["x"].double()
    finite = v["with_nan"][~v["with_nan"].isnan()].double()
    assert out == pytest.approx({"m/mean": float(x.mean()), "m/std": float(x.std(unbiased=False)),
                                 "m/ratio": float(v["num"].sum() / v["den"].sum()), "m/min": float(x.min()),
                                 "m/max": float(x.max()), "m/nan_mean": float(finite.mean())})


@pytest.mark.distributed
def test_reduce_over_two_gloo_ranks_equals_the_pooled_values(tmp_path):
    values = _values()
    parts = [[0, 3, 5, 6, 9, 10], [1, 2, 4, 7, 8]]  # unequal shares; the NaNs (1, 4) both on rank 1
    torch.save({"values": values, "parts": parts}, tmp_path / "in.pt")
    run_torchrun(WORKER, 2, "metrics", tmp_path / "in.pt", tmp_path)
    expected = fill_metrics(values).reduce()
    for rank in range(2):
        got = torch.load(tmp_path / f"metrics_rank{rank}.pt")
        assert got == pytest.approx(expected, rel=1e-12), rank  # every rank gets the same, pooled values
    # one rank's values alone differ (the test is not vacuous)
    alone = fill_metrics({k: v[parts[0]] for k, v in values.items()}).reduce()
    assert alone["m/mean"] != pytest.approx(expected["m/mean"])


def test_ratio_of_means_by_hand():
    """mean(num) / (mean(den) + eps): num [0.2, 0.25], den [0.2, 0.5] -> 0.225 / (0.35 + 1e-8); with no
    early token marked anywhere (den all 0) the eps keeps it finite: 0.1 / 1e-8 = 1e7."""
    m = MetricSums()
    m.ratio_of_means("r", T([0.2, 0.25]), T([0.2, 0.5]), eps=1e-8)
    assert m.reduce()["r"] == pytest.approx(0.225 / (0.35 + 1e-8))
    m = MetricSums()
    m.ratio_of_means("r", T([0.1]), T([0.0]), eps=1e-8)
    assert m.reduce()["r"] == pytest.approx(1e7)
    with pytest.raises(ValueError, match="recorded as ratio_of_means"):
        m.mean("r", T([1.0]))
