"""Scalars to log, kept as reducible parts until they are logged, so that every data-parallel rank counts.

A method computes its diagnostics on its own rows; a mean over the whole step is a sum and a count
added over data-parallel ranks, a std needs the sum of squares too, a min or max its own reduction.
``MetricSums`` records those parts; ``reduce(group)`` does ONE all-reduce for the sums and one for the
extrema, and returns the finished values. Nothing here is differentiable or on the critical path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class MetricSums:
    """Named diagnostics in reducible form: ``mean``/``std`` over the given elements, ratios, ``min``/``max``."""

    sums: dict[str, tuple[str, list[torch.Tensor]]] = field(default_factory=dict)  # name -> (kind, parts)
    extrema: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)  # name -> ("min"|"max", value)

    def mean(self, name: str, values: torch.Tensor) -> None:
        """The mean of ``values`` (any shape; non-finite values left out) over all ranks."""
        v = values.detach().double().flatten()
        v = v[torch.isfinite(v)]
        self._add(name, "mean", [v.sum(), v.new_tensor(float(v.numel()))])

    def std(self, name: str, values: torch.Tensor) -> None:
        """The population standard deviation of ``values`` over all ranks."""
        v = values.detach().double().flatten()
        self._add(name, "std", [v.sum(), v.new_tensor(float(v.numel())), (v * v).sum()])

    def ratio(self, name: str, numerator: torch.Tensor, denominator: torch.Tensor) -> None:
        """``sum(numerator) / sum(denominator)`` over all ranks (e.g. a fraction of tokens)."""
        self._add(name, "ratio", [numerator.detach().double().sum(), denominator.detach().double().sum()])

    def ratio_of_means(self, name: str, numerator: torch.Tensor, denominator: torch.Tensor, eps: float) -> None:
        """``mean(numerator) / (mean(denominator) + eps)`` over all ranks, both ``[n]`` vectors of one
        length (e.g. a late/early ratio of per-response fractions)."""
        num, den = numerator.detach().double(), denominator.detach().double()
        self._add(name, f"ratio_of_means:{eps!r}", [num.sum(), den.sum(), num.new_tensor(float(num.numel()))])

    def update(self, other: "MetricSums") -> "MetricSums":
        for name, (kind, parts) in other.sums.items():
            self._add(name, kind, parts)
        for name, (kind, value) in other.extrema.items():
            self._extremum(name, kind, value)
        return self

    def _add(self, name: str, kind: str, parts: list[torch.Tensor]) -> None:
        if name in self.sums:
            old_kind, old = self.sums[name]
            if old_kind != kind:
                raise ValueError(f"metric {name!r} recorded as {old_kind} and as {kind}")
            parts = [a + b for a, b in zip(old, parts)]
        self.sums[name] = (kind, list(parts))

    def min(self, name: str, values: torch.Tensor) -> None:
        self._extremum(name, "min", values)

    def max(self, name: str, values: torch.Tensor) -> None:
        self._extremum(name, "max", values)

    def _extremum(self, name: str, kind: str, values: torch.Tensor) -> None:
        v = values.detach().double().flatten()
        inf = float("inf") if kind == "min" else float("-inf")
        value = (v.min() if kind == "min" else v.max()) if v.numel() else v.new_tensor(inf)
        if name in self.extrema:
            old = self.extrema[name][1]
            value = torch.minimum(old, value) if kind == "min" else torch.maximum(old, value)
        self.extrema[name] = (kind, value)

    def reduce(self, group=None) -> dict[str, float]:
        """The finished values, reduced over ``group`` (all ranks of it must call, with the same names)."""
        names = sorted(self.sums)
        out: dict[str, float] = {}
        if names:
            flat = torch.cat([torch.stack(self.sums[n][1]) for n in names])
            _all_reduce(flat, dist.ReduceOp.SUM, group)
            values, i = flat.tolist(), 0
            for n in names:
                kind, parts = self.sums[n][0], values[i:i + len(self.sums[n][1])]
                i += len(parts)
                out[n] = _finish(kind, parts)
        ext = sorted(self.extrema)
        if ext:
            signed = torch.stack([-self.extrema[n][1] if self.extrema[n][0] == "min" else self.extrema[n][1]
                                  for n in ext])  # every extremum as a max
            _all_reduce(signed, dist.ReduceOp.MAX, group)
            for n, value in zip(ext, signed.tolist()):
                value = -value if self.extrema[n][0] == "min" else value
                out[n] = value if math.isfinite(value) else float("nan")
        return out


def _finish(kind: str, parts: list[float]) -> float:
    if kind in ("mean", "ratio"):
        return parts[0] / parts[1] if parts[1] > 0 else float("nan")
    if kind == "std":
        total, count, squares = parts
        return math.sqrt(max(squares / count - (total / count) ** 2, 0.0)) if count > 0 else float("nan")
    eps = float(kind.split(":", 1)[1])  # ratio_of_means
    num, den, count = parts
    return (num / count) / (den / count + eps) if count > 0 else float("nan")


def _all_reduce(t: torch.Tensor, op, group) -> None:
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
