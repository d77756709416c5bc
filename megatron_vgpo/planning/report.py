"""The memory plan of a config file, as text: the per-stage table of both phases, the vLLM engine,
host RAM and the verdict (with a pipeline, the decoder layers and the FLOP model's work per stage);
and the block of it kept in each example config's header.

A config's header names its GPU and world size (``# gpu: H100 80GB``, ``# world size: 32``), which
``tools/plan_memory.py`` and ``--dry-run`` use, and holds the plan between ``BEGIN`` and ``END``
(``tools/plan_memory.py --config FILE --write`` refreshes it; a test keeps it in sync).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional

from megatron_vgpo.distributed.layout import ParallelLayout
from megatron_vgpo.planning.architectures import ArchitectureError, resolve_shape, total_params, vision_params
from megatron_vgpo.planning.flops import describe_stages, stage_flops, workload_from_config
from megatron_vgpo.planning.memory import GiB, Gpu, MemoryPlan, image_patches, plan_from_config

BEGIN = "# memory-plan:begin (tools/plan_memory.py --write refreshes this block)"
END = "# memory-plan:end"
_GPU_LINE = re.compile(r"^#\s*gpu:\s*(?P<name>.*?)\s*(?P<gb>\d+(?:\.\d+)?)\s*GB\b", re.IGNORECASE | re.MULTILINE)
_WORLD_LINE = re.compile(r"^#\s*world size:\s*(?P<n>\d+)", re.IGNORECASE | re.MULTILINE)


def header_gpu(path: str) -> Optional[Gpu]:
    """The GPU a config's header names (``# gpu: H100 80GB`` -> 80 GiB), or None."""
    match = _GPU_LINE.search(Path(path).read_text())
    return Gpu(f"{match['name']} {match['gb']}GB".strip(), float(match["gb"])) if match else None


def header_world_size(path: str) -> Optional[int]:
    """The world size a config's header names (``# world size: 32``), or None."""
    match = _WORLD_LINE.search(Path(path).read_text())
    return int(match["n"]) if match else None


def config_plan(cfg, layout: ParallelLayout, config_path: Optional[str] = None,
                gpu: Optional[Gpu] = None) -> Optional[MemoryPlan]:
    """The plan of ``cfg`` on ``gpu`` (default: the GPU its file's header names, else an 80 GiB one),
    under the pipeline split the FLOP model resolves for it, with its per-stage FLOPs at PP > 1;
    None for a CPU run (``trainer.device=cpu``); ``ArchitectureError`` when the model is unknown."""
    if cfg.trainer.device == "cpu":
        return None
    gpu = gpu or (header_gpu(config_path) if config_path else None) or Gpu()
    shape = resolve_shape(cfg.model.hf_path)
    plan = plan_from_config(cfg, layout, gpu, shape)  # its layout: 'auto' resolved
    if plan.layout.pp == 1:
        return plan
    return dataclasses.replace(plan, stage_flops=stage_flops(shape, plan.layout, workload_from_config(cfg, shape)))


def dry_run_plan(cfg, layout: ParallelLayout, config_path: str) -> str:
    """The plan under a ``# memory plan`` heading, as YAML comments (``--dry-run`` output stays
    YAML); one line saying why when there is none (a CPU run, an unknown model)."""
    try:
        plan = config_plan(cfg, layout, config_path)
    except ArchitectureError as e:
        return f"# memory plan: unavailable: {e}"
    if plan is None:
        return "# memory plan: none for a CPU run (trainer.device=cpu)"
    return "\n".join(["# memory plan"] + [f"# {line}" for line in render_plan(plan).splitlines()])


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return [fmt(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows]


def render_plan(plan: MemoryPlan) -> str:
    """The plan as text: what was assumed, one table row per stage and phase (GiB per GPU), the
    engine's KV cache, host RAM per rank, and the verdict."""
    shape, lay, gpu, tr, eng, res = plan.shape, plan.layout, plan.gpu, plan.train, plan.engine, plan.reserve
    n, vis = total_params(shape), vision_params(shape.vision)
    patches = image_patches(tr.image_pixels, shape.vision)
    on = lambda flag: "on" if flag else "off"  # noqa: E731
    lines = [
        f"{shape.name}: {n / 1e9:.2f}B params ({(n - vis) / 1e9:.2f}B language model + {vis / 1e9:.2f}B vision); "
        f"{lay.describe(shape.num_layers)}",
        f"GPU {gpu.describe()}; values in GiB (2^30 bytes) per GPU",
        f"training peak: micro-batch {tr.micro_batch_size} x {tr.seq_len} tokens + "
        f"{tr.images_per_micro_batch or tr.micro_batch_size} image(s) "
        f"of {patches} patches ({tr.image_pixels / 1e6:.2f} MP); micro-batches in flight per stage: "
        f"{', '.join(str(st.in_flight) for st in plan.stages)}",
        *([describe_stages(plan.stage_flops)] if plan.stage_flops else []),
        f"recompute {on(tr.recompute)}, sequence parallel {on(tr.sequence_parallel)}, distributed optimizer "
        f"{on(tr.distributed_optimizer)}, offload during rollout {on(tr.offload_during_rollout)}",
        f"reserve: CUDA context {res.cuda_context_gib:g} + NCCL {res.nccl_gib_per_communicator:g} x "
        f"{plan.communicators} communicators + {res.fragmentation:.0%} of the trainer's tensors (fragmentation); "
        f"sleeping engine {res.engine_asleep_gib:g}",
    ]
    names = [name for name, _ in plan.stages[0].training.items]
    rows = []
    for st in plan.stages:
        for phase, mem in (("training", st.training), ("rollout", st.rollout)):
            free = (gpu.capacity - mem.total) / GiB
            rows.append([str(st.stage), phase] + [f"{v / GiB:.1f}" for _, v in mem.items]
                        + [f"{mem.total / GiB:.1f}", f"{free:.1f}"])
    lines += _table(["stage", "phase"] + names + ["total", "free"], rows)
    lines.append(
        f"vLLM engine per GPU (TP {eng.tp}): budget {eng.budget / GiB:.1f} = weights {eng.weights / GiB:.1f} + "
        f"activation peak {eng.activations / GiB:.1f} + KV cache {eng.kv_cache / GiB:.1f} GiB; "
        f"{eng.kv_bytes_per_token / 1024:g} KiB per token -> {eng.kv_tokens / 1e6:.2f}M tokens = "
        f"{eng.kv_tokens // eng.max_model_len} sequences of {eng.max_model_len}")
    lines.append("host RAM per rank: " + "; ".join(_host_lines(plan)))
    lines.append("fits" if plan.fits else "DOES NOT FIT: " + "; ".join(plan.problems))
    return "\n".join(lines)


def _host_lines(plan: MemoryPlan) -> list[str]:
    """``stage(s) N[-M] X GiB (item x, ...)``, consecutive stages with the same host RAM merged."""
    groups: list[tuple[list[int], str]] = []
    for st in plan.stages:
        text = f"{st.host.total / GiB:.1f} GiB (" + ", ".join(f"{k} {v / GiB:.1f}" for k, v in st.host.items if v) + ")"
        if groups and groups[-1][1] == text:
            groups[-1][0].append(st.stage)
        else:
            groups.append(([st.stage], text))
    return [f"stage {s[0]} {text}" if len(s) == 1 else f"stages {s[0]}-{s[-1]} {text}" for s, text in groups]


def plan_block(text: str) -> Optional[str]:
    """The plan kept between the markers of a config file's ``text`` (comment marks removed), or None."""
    if BEGIN not in text or END not in text:
        return None
    body = text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")
    return "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines())


def with_plan_block(text: str, rendered: str) -> str:
    """``text`` with the block replaced by ``rendered`` (inserted at the end of the leading
    comments when the file has none yet)."""
    block = "\n".join([BEGIN] + [f"# {line}".rstrip() for line in rendered.splitlines()] + [END])
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1]
    lines = text.splitlines(keepends=True)
    at = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    return "".join(lines[:at]) + block + "\n" + "".join(lines[at:])
