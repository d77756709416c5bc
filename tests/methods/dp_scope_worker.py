"""torchrun worker of ``test_vppo.py`` and ``test_metrics.py``: step-wide reductions over gloo ranks.

    torchrun --nproc-per-node N dp_scope_worker.py {scale,metrics} IN_FILE OUT_DIR

``IN_FILE`` (``torch.save``) holds the whole step's inputs and ``parts``: the rows of each rank.
``scale``: VPPO's ``trajectory_scale`` on this rank's rows, ``batch`` scope reduced over the world
group (and ``group`` scope, which must not reduce), saved as ``OUT_DIR/scale_rank<r>.pt``.
``metrics``: a ``MetricSums`` of this rank's values reduced over the world group, saved as
``OUT_DIR/metrics_rank<r>.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_vgpo.methods.metrics import MetricSums
from megatron_vgpo.methods.vppo import trajectory_scale


def fill_metrics(values: dict[str, torch.Tensor]) -> MetricSums:
    """The same recipe on every rank and in the single-process reference (``test_metrics.py``)."""
    m = MetricSums()
    m.mean("m/mean", values["x"])
    m.std("m/std", values["x"])
    m.ratio("m/ratio", values["num"], values["den"])
    m.min("m/min", values["x"])
    m.max("m/max", values["x"])
    m.mean("m/nan_mean", values["with_nan"])
    return m


def main(mode: str, in_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    data = torch.load(in_file)
    rows = torch.tensor(data["parts"][rank], dtype=torch.long)
    if mode == "scale":
        out = {scope: trajectory_scale(data["S"][rows], data["b_min"], scope, data["group_ids"][rows],
                                       dp_group=dist.group.WORLD)
               for scope in ("batch", "group")}
    elif mode == "metrics":
        out = fill_metrics({k: v[rows] for k, v in data["values"].items()}).reduce(dist.group.WORLD)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    torch.save(out, Path(out_dir) / f"{mode}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
