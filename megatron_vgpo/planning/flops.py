"""The FLOP model of the pipeline stages: the work one GPU of each stage does for one training
micro-batch, and the uneven split of the decoder layers that balances it
(``parallel.first_stage_layers`` / ``last_stage_layers: auto``).

Why: stage 0 runs the vision tower besides its decoder layers, and the tower is replicated on every
TP rank (``models/qwen2_5_vl/vision.py``), so TP does not shrink it; the last stage runs the output
layer. With an even split stage 0 is the pipeline's bottleneck, and a 1F1B step lasts about
(micro-batches + PP - 1) x the slowest stage's micro-batch. Megatron's uneven first / last stages
(``distributed/layout.py``) move decoder layers off it.

Forward FLOPs of one micro-batch of ``b`` rows of ``s`` tokens (``T = b s``), on one GPU of TP ``t``
(matmuls: 2 FLOPs per parameter and token, the family of ``training.logging.flops_per_token``):

    decoder layer   T (2 N_layer + 4 h s) / t      N_layer its parameters; 4 h s: Q K^T and A V over s
                                                   keys (PaLM's convention, no halving for the causal mask)
    vision tower    per distinct image of P = pixels / 14^2 patches, NOT divided by t (replicated):
                    blocks      P 2 N_block + 4 c P W     W = min(P, window patches) in a window-attention
                                                          block (8 x 8 = 64), W = P in a full-attention one
                    patch embed 2 P (C t_p p^2) c;  merger 2 (P / m^2) ((m^2 c)^2 + m^2 c o)
    output layer    2 h V T / t                    the logits; the vocab-parallel log-softmax and the
                                                   embedding lookup are not matmuls (not counted)

A training micro-batch runs the forward 3 times (backward = 2 forwards), 4 times what full
recomputation re-runs (``model.recompute_activations``: the decoder layers and the vision blocks, not
the output layer); a frozen tower runs forward only (no grad). The ``n`` responses of a prompt share
its image, which a micro-batch encodes once (``image_index`` in ``models/qwen2_5_vl/model.py``):
``mean_distinct_images(b, n)`` images per micro-batch on average (``ceil(b / n)`` when one divides
the other; at least 1).

Balance is reported as max / mean stage FLOPs (1.0: perfectly balanced).

Limits: FLOPs stand for time, so every component is assumed to run at the same efficiency (the
tower's narrow matmuls and its attention may not); and a config is balanced at its bounds (every
row at max prompt + max response, every image at ``data.max_pixels`` or the most a prompt holds, as
the memory plan), so for much smaller images a split chosen there leaves stage 0 under-loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from megatron_vgpo.distributed.layout import AUTO, ParallelLayout, PipelineSplit
from megatron_vgpo.planning.architectures import ModelShape, VisionShape, decoder_layer_params, vision_block_params
from megatron_vgpo.planning.memory import group_size, image_patches


@dataclass(frozen=True)
class Workload:
    """One training micro-batch as the FLOP model sees it."""

    micro_batch_size: int  # rows (responses)
    seq_len: int  # tokens per row (prompt + response, padded)
    image_patches: int = 0  # patches of each image (0: text only)
    images_per_micro_batch: float = 1.0  # distinct images encoded per micro-batch (a mean)
    recompute: bool = False
    freeze_vision: bool = False


@dataclass(frozen=True)
class StageFlops:
    """FLOPs of one GPU of a stage for one training micro-batch (forward + backward [+ recompute])."""

    stage: int
    layers: int
    decoder: float
    vision: float
    output: float

    @property
    def total(self) -> float:
        return self.decoder + self.vision + self.output


# ------------------------------------------------------------------------------------ formulas

def decoder_layer_flops(shape: ModelShape, tokens: int, seq_len: int) -> float:
    """Forward FLOPs of one decoder layer over ``tokens`` tokens in rows of ``seq_len`` (all TP ranks)."""
    return tokens * (2 * decoder_layer_params(shape) + 4 * shape.hidden_size * seq_len)


def vision_flops(v: VisionShape, patches: int) -> tuple[float, float]:
    """``(blocks, patch embed + merger)`` forward FLOPs of the tower on one image of ``patches``."""
    c, m2 = v.hidden_size, v.spatial_merge_size ** 2
    window = min(patches, (v.window_size // v.patch_size) ** 2)
    full = sum(1 for i in v.fullatt_block_indexes if i < v.depth)
    attention = 4 * c * patches * (full * patches + (v.depth - full) * window)
    blocks = v.depth * patches * 2 * vision_block_params(v) + attention
    embed = 2 * patches * v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * c
    merger = 2 * (patches / m2) * ((m2 * c) ** 2 + m2 * c * v.out_hidden_size)
    return float(blocks), float(embed + merger)


def output_layer_flops(shape: ModelShape, tokens: int) -> float:
    """Forward FLOPs of the logits over ``tokens`` tokens (all TP ranks)."""
    return 2.0 * shape.hidden_size * shape.vocab_size * tokens


def mean_distinct_images(micro_batch_size: int, n: int) -> float:
    """Distinct images per micro-batch, on average: the ``n`` rows of a prompt are adjacent and
    micro-batch ``k`` holds rows ``k b .. (k + 1) b - 1``, a pattern that repeats every ``n``
    micro-batches (``memory.distinct_images`` is the worst one, for memory)."""
    b = micro_batch_size
    return sum(((k + 1) * b - 1) // n - (k * b) // n + 1 for k in range(n)) / n


# ------------------------------------------------------------------------------------ stages

def stage_flops(shape: ModelShape, layout: ParallelLayout, work: Workload) -> tuple[StageFlops, ...]:
    """Per stage, the FLOPs of one GPU for one training micro-batch under ``layout`` (a resolved split)."""
    tokens = work.micro_batch_size * work.seq_len
    recompute = 1 if work.recompute else 0
    layer = decoder_layer_flops(shape, tokens, work.seq_len) * (3 + recompute) / layout.tp
    blocks, rest = vision_flops(shape.vision, work.image_patches) if work.image_patches else (0.0, 0.0)
    per_image = blocks + rest if work.freeze_vision else blocks * (3 + recompute) + rest * 3
    vision = work.images_per_micro_batch * per_image
    output = 3 * output_layer_flops(shape, tokens) / layout.tp
    counts = layout.stage_layers(shape.num_layers)
    last = layout.pp - 1
    return tuple(StageFlops(p, n, n * layer, vision if p == 0 else 0.0, output if p == last else 0.0)
                 for p, n in enumerate(counts))


def imbalance(stages: tuple[StageFlops, ...]) -> float:
    """Max / mean of the stages' FLOPs (1.0: balanced)."""
    totals = [s.total for s in stages]
    return max(totals) / (sum(totals) / len(totals))


def balanced_split(shape: ModelShape, layout: ParallelLayout, work: Workload) -> PipelineSplit:
    """``layout.split`` with each 'auto' count replaced by the one that minimises the slowest stage's
    FLOPs: every count Megatron accepts (``PipelineSplit.stage_layers``) is tried, 'not set' (an even
    share) included; on a tie the split with fewer counts set wins, then the one that sets the first
    stage's. At PP 1 'auto' means not set."""
    split = layout.split
    if layout.pp < 2:
        return PipelineSplit(*(None if c == AUTO else c for c in (split.first, split.last)))
    options = [None, *range(1, shape.num_layers + 1)]
    best: Optional[tuple[tuple, PipelineSplit]] = None
    for first in options if split.first == AUTO else [split.first]:
        for last in options if split.last == AUTO else [split.last]:
            candidate = PipelineSplit(first, last)
            try:
                stages = stage_flops(shape, dataclasses.replace(layout, split=candidate), work)
            except ValueError:  # Megatron would refuse it
                continue
            key = (max(s.total for s in stages), (first is not None) + (last is not None), last is not None)
            if best is None or key < best[0]:
                best = (key, candidate)
    if best is None:
        raise ValueError(f"no pipeline split of {shape.num_layers} layers over PP {layout.pp}"
                         f"{f' x VPP {layout.vpp}' if layout.vpp else ''} satisfies Megatron's rules with "
                         f"parallel.first_stage_layers={split.first!r}, last_stage_layers={split.last!r}")
    return best[1]


# ------------------------------------------------------------------------------------ a config

def workload_from_config(cfg, shape: ModelShape) -> Workload:
    """A validated ``Config``'s training micro-batch at its bounds: rows of max prompt + max response
    tokens, images at ``data.max_pixels`` or the most a prompt holds (as the memory plan)."""
    ro, tr = cfg.rollout, cfg.trainer
    return Workload(
        micro_batch_size=tr.micro_batch_size, seq_len=ro.max_prompt_length + ro.max_response_length,
        image_patches=image_patches(cfg.data.max_pixels, shape.vision, ro.max_prompt_length),
        images_per_micro_batch=mean_distinct_images(tr.micro_batch_size, group_size(cfg)),
        recompute=cfg.model.recompute_activations, freeze_vision=cfg.model.freeze_vision)


def resolve_split(cfg, layout: ParallelLayout, shape: ModelShape) -> ParallelLayout:
    """``layout`` with 'auto' in its split replaced by the FLOP model's choice for ``cfg`` (the same
    layout when nothing is 'auto'). Every rank computes the same choice from the same config."""
    if layout.split.is_resolved:
        return layout
    return dataclasses.replace(layout, split=balanced_split(shape, layout, workload_from_config(cfg, shape)))


def describe_stages(stages: tuple[StageFlops, ...]) -> str:
    """One line: TFLOPs per GPU and micro-batch of each stage, and the imbalance."""
    per = ", ".join(f"{s.total / 1e12:.1f}" for s in stages)
    return (f"FLOP model (planning/flops.py), TFLOP per GPU per training micro-batch, by stage: {per}; "
            f"max/mean {imbalance(stages):.3f}")
