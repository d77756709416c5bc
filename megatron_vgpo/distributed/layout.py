"""The TP x PP x DP layout of a world size and the decoder layers of each pipeline stage: pure
arithmetic, no process groups.

Used by config validation and ``--dry-run`` (which may describe a 32-GPU layout on a laptop), by the
memory and FLOP models (``planning/``), by the model builder (Megatron's uneven-stage fields) and by
``parallel.py`` when it creates the process groups.

Uneven stages (``PipelineSplit``) are Megatron-Core's ``num_layers_in_first_pipeline_stage`` /
``num_layers_in_last_pipeline_stage`` (``TransformerConfig.__post_init__``,
``get_num_layers_to_build``, ``get_transformer_layer_offset``; ``tests/distributed/test_layout.py``
compares this module with them). Their rules, checked here so that a bad split fails before any
model is built:

- each set count is >= 1; the stages it does not set (the "middle" ones, the last stage included
  when only the first is set) share the remaining layers EVENLY, so their number must divide them,
  and there must be remaining layers exactly when there are such stages;
- with a virtual pipeline each set count, and each middle stage's share, must be divisible by the
  number of model chunks, and there must be a middle stage (Megatron's interleaved offsets divide by
  their number); chunk ``v`` of every stage then holds 1/vpp of that stage's layers, and the layers
  are numbered chunk-major (all of chunk 0 over the stages, then chunk 1, ...);
- Megatron does not check that the set counts leave a non-negative number of layers (it then builds
  overlapping stages); this module refuses that too;
- they are plain ``TransformerConfig`` fields, so every layer keeps a global ``layer_number``: HF
  loading, the weight resharder and distributed checkpoints (whose layer axis is global) see the
  same names under any split.

Megatron ignores the offset arithmetic at PP = 1 but would still build only the first-stage count,
so a split needs PP >= 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

AUTO = "auto"
StageCount = Union[int, str, None]  # a layer count, "auto" (the FLOP model's choice, not yet made) or None


@dataclass(frozen=True)
class PipelineSplit:
    """Decoder layers of the first and of the last pipeline stage (``parallel.first_stage_layers`` /
    ``parallel.last_stage_layers``); None: that stage takes an even share like the others; "auto":
    to be chosen by ``planning.flops.resolve_split`` (nothing here accepts it unresolved)."""

    first: StageCount = None
    last: StageCount = None

    @property
    def is_even(self) -> bool:
        return self.first is None and self.last is None

    @property
    def is_resolved(self) -> bool:
        return AUTO not in (self.first, self.last)

    def stage_layers(self, num_layers: int, pp: int, vpp: Optional[int] = None) -> tuple[int, ...]:
        """Decoder layers of each pipeline stage, first stage first; ValueError naming the config
        fields when Megatron would refuse the split (see the module docstring)."""
        chunks = vpp or 1
        if self.is_even:
            if num_layers % (pp * chunks):
                raise ValueError(f"text_config.num_hidden_layers={num_layers} is not divisible by "
                                 f"parallel.pipeline_model_parallel_size x virtual stages = {pp * chunks}; "
                                 f"or set parallel.first_stage_layers / last_stage_layers")
            return (num_layers // pp,) * pp
        self._check_counts(pp, vpp)
        middle_stages = pp - (self.first is not None) - (self.last is not None)
        middle_layers = num_layers - (self.first or 0) - (self.last or 0)
        self._check_middle(num_layers, middle_stages, middle_layers, vpp)
        counts = [middle_layers // middle_stages if middle_stages else 0] * pp
        if self.first is not None:
            counts[0] = self.first
        if self.last is not None:
            counts[-1] = self.last
        return tuple(counts)

    def _check_counts(self, pp: int, vpp: Optional[int]) -> None:
        if not self.is_resolved:
            raise ValueError(f"parallel.first_stage_layers={self.first!r} / parallel.last_stage_layers={self.last!r}: "
                             f"'auto' must be resolved by the FLOP model first (planning.flops.resolve_split)")
        if pp < 2:
            raise ValueError(f"parallel.first_stage_layers={self.first} / last_stage_layers={self.last} need "
                             f"parallel.pipeline_model_parallel_size >= 2 (got {pp}); set them to null")
        for name, count in (("first", self.first), ("last", self.last)):
            if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
                raise ValueError(f"parallel.{name}_stage_layers={count!r} is invalid: must be >= 1, 'auto' or null")
            if count is not None and count % (vpp or 1):
                raise ValueError(f"parallel.{name}_stage_layers={count} is not divisible by "
                                 f"parallel.virtual_pipeline_model_parallel_size={vpp}")

    def _check_middle(self, num_layers: int, middle_stages: int, middle_layers: int, vpp: Optional[int]) -> None:
        """The stages the split does not set share ``middle_layers`` evenly (Megatron's rules)."""
        if vpp and not middle_stages:  # Megatron's interleaved offsets divide by the middle stages
            raise ValueError("parallel.first_stage_layers and last_stage_layers both set at "
                             "parallel.pipeline_model_parallel_size=2 with a virtual pipeline: Megatron needs a "
                             "stage between them; set one of them to null")
        if middle_layers < 0 or (middle_layers > 0) != (middle_stages > 0):
            raise ValueError(f"parallel.first_stage_layers={self.first} / last_stage_layers={self.last} leave "
                             f"{middle_layers} of text_config.num_hidden_layers={num_layers} layers for the "
                             f"{middle_stages} other pipeline stage(s): each needs at least one")
        if middle_stages and middle_layers % (middle_stages * (vpp or 1)):
            raise ValueError(f"parallel.first_stage_layers={self.first} / last_stage_layers={self.last} leave "
                             f"{middle_layers} layers, not divisible by the {middle_stages} other pipeline "
                             f"stage(s){f' x {vpp} virtual stages' if vpp else ''} (Megatron splits them evenly)")

    def layer_indices(self, num_layers: int, pp: int, vpp: Optional[int] = None) -> tuple[tuple[int, ...], ...]:
        """Global (0-based) decoder layer indices of each stage, as Megatron numbers them: contiguous
        per stage, or chunk-major with a virtual pipeline."""
        counts = self.stage_layers(num_layers, pp, vpp)
        chunks = vpp or 1
        owned: list[list[int]] = [[] for _ in range(pp)]
        start = 0
        for _ in range(chunks):
            for stage, count in enumerate(counts):
                per_chunk = count // chunks
                owned[stage].extend(range(start, start + per_chunk))
                start += per_chunk
        return tuple(tuple(layers) for layers in owned)

    def megatron_fields(self) -> dict:
        """The ``TransformerConfig`` fields of this split (none for the even split)."""
        if not self.is_resolved:
            raise ValueError("an 'auto' pipeline split must be resolved before the model is built "
                             "(planning.flops.resolve_split)")
        fields = {}
        if self.first is not None:
            fields["num_layers_in_first_pipeline_stage"] = self.first
        if self.last is not None:
            fields["num_layers_in_last_pipeline_stage"] = self.last
        return fields


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    tp: int
    pp: int
    dp: int
    vpp: int | None = None
    split: PipelineSplit = field(default_factory=PipelineSplit)

    def stage_layers(self, num_layers: int) -> tuple[int, ...]:
        """Decoder layers of each pipeline stage (``PipelineSplit.stage_layers``)."""
        return self.split.stage_layers(num_layers, self.pp, self.vpp)

    def describe(self, num_layers: Optional[int] = None) -> str:
        """``world size 8 = TP 2 x PP 2 x DP 2``; with ``num_layers`` (and a resolved split) also
        the decoder layers per stage, e.g. ``; decoder layers per stage 14 + 50``."""
        vpp = f" (virtual pipeline {self.vpp} chunks per rank)" if self.vpp else ""
        text = f"world size {self.world_size} = TP {self.tp} x PP {self.pp} x DP {self.dp}{vpp}"
        if num_layers is not None and self.pp > 1 and self.split.is_resolved:
            counts = self.stage_layers(num_layers)
            text += f"; decoder layers per stage {' + '.join(map(str, counts))}"
            text += " (even)" if self.split.is_even else ""
        return text


def parallel_layout(parallel, world_size: int) -> ParallelLayout:
    """Layout of ``world_size`` ranks under a ``ParallelConfig``; ValueError names the fields when
    the world size is not a multiple of TP x PP. The split is taken as configured ("auto" stays
    unresolved: the FLOP model needs the rest of the config, ``planning.flops.resolve_split``)."""
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    if world_size < 1 or world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size x "
            f"parallel.pipeline_model_parallel_size = {tp} x {pp} = {tp * pp}")
    return ParallelLayout(world_size, tp, pp, world_size // (tp * pp), parallel.virtual_pipeline_model_parallel_size,
                          PipelineSplit(parallel.first_stage_layers, parallel.last_stage_layers))
