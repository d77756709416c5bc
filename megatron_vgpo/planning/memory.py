"""The memory model: GPU bytes per pipeline stage in the training and the rollout phase, host RAM per rank.

Pure arithmetic over shapes (no torch), so a 72B plan runs on a laptop; ``tools/plan_memory.py`` and
``--dry-run`` print it for a config, and a GPU check compares it with measured peaks through the
shape-level API (``training_memory`` / ``rollout_memory`` / ``plan_memory``).

What each rank holds (the trainer's setup, ``training/actor.py``):

- Training state, per parameter on the rank: bf16 weights (2 B), fp32 main grads (4 B, DDP with
  ``grad_reduce_in_fp32``, full size on every rank), fp32 master weights + Adam m, v (12 B, divided
  by DP under Megatron's distributed optimizer). Stage 0 holds the embedding and the whole vision
  tower (replicated on every TP rank); the last stage the output layer (a copy of the embedding
  when tied and PP > 1). A frozen tower has weights only.
- Decoder layers per stage: an even share, or Megatron's uneven first / last stage
  (``ParallelLayout.split``; ``parallel.first_stage_layers: auto`` is resolved by the FLOP model,
  ``flops.resolve_split``, before a config's plan is made).
- Activations of the micro-batches in flight (``in_flight``): 1F1B keeps PP - p on stage p, the
  interleaved schedule Megatron's warm-up count + 1 model-chunk micro-batches. Per decoder layer see
  ``layer_activation_bytes``; with ``recompute`` a layer keeps only its input, and one layer's
  activations are rebuilt at a time in the backward.
- Vision tower activations per image patch (``vision_activation_bytes``); logits on the last stage
  (``logits_bytes``).
- Rollout: the vLLM engine takes ``gpu_memory_utilization`` x GPU memory (its weights, its profiled
  activation peak, the rest KV cache) next to the training state, less what
  ``optimizer.offload_during_rollout`` takes off the GPU (``training/offload.py``: the optimizer
  states move to the host, the grad buffers are freed). While the policy trains the engine sleeps:
  its weights are discarded (level 2) or copied to the host (1).
- A reserve: CUDA context, NCCL communicators, allocator fragmentation (``Reserve``).

A GPU check predicts one step of explicit shapes and compares it with
``torch.cuda.max_memory_allocated()`` (the reserve is outside the caching allocator's count):

    mem = training_memory(shape_from_hf_config(hf_config), ParallelLayout(1, 1, 1, 1),
                          TrainShapes(micro_batch_size=1, seq_len=4096, image_pixels=1 << 20, recompute=True),
                          stage=0)
    mem.total_without("reserve"), mem["decoder act"], ...

Units: bytes in the API; the report prints GiB (2^30 bytes). A GPU sold as "80 GB" (H100) has 80 GiB
of HBM; ``Gpu.gib`` is that nominal size and the reserve covers what the driver keeps of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from megatron_vgpo.distributed.layout import ParallelLayout
from megatron_vgpo.planning.architectures import (
    ModelShape,
    VisionShape,
    decoder_layer_params,
    embedding_params,
    total_params,
    vision_params,
)

GiB = 2 ** 30
LOGITS_BYTES_PER_ELEMENT = 2 + 3 * 4
"""bf16 logits, then fp32: the upcast, the shifted/exponentiated copy and its gradient."""
SAMPLER_COPIES = 3
"""fp32 copies of the ``[max_num_seqs, vocab]`` logits in vLLM's profiled sampler run."""
VLLM_MM_CACHE_GIB = 4.0
"""vLLM's multimodal processor cache on the host (``mm_processor_cache_gb``, default 4)."""


@dataclass(frozen=True)
class Gpu:
    name: str = ""  # e.g. "H100 80GB"
    gib: float = 80.0  # nominal memory; "80 GB" H100 = 80 GiB

    @property
    def capacity(self) -> int:
        return int(self.gib * GiB)

    def describe(self) -> str:
        size = f"{self.gib:g} GiB = {self.capacity / 1e9:.1f} GB"
        return f"{self.name}: {size}" if self.name else size


@dataclass(frozen=True)
class Reserve:
    """Memory outside the tensors the model counts. The numbers are assumptions, stated here."""

    cuda_context_gib: float = 1.5  # context + kernels (torch, TE, flash-attn, vLLM) + what the driver keeps
    nccl_gib_per_communicator: float = 0.5  # NCCL buffers (P2P/NVLS) per communicator of > 1 rank
    fragmentation: float = 0.05  # caching-allocator slack over the trainer's tensors (variable lengths)
    cuda_graphs_gib: float = 1.0  # vLLM's CUDA-graph pool (not inside its budget; absent with enforce_eager)
    engine_asleep_gib: float = 0.25  # buffers a sleeping engine keeps
    host_process_gib: float = 6.0  # per rank: Python, CUDA/NCCL/TE/vLLM libraries, tokenizer, data loader


@dataclass(frozen=True)
class TrainShapes:
    """What a training rank runs: explicit shapes (a GPU check), or a config's (``plan_from_config``)."""

    micro_batch_size: int  # responses per micro-batch
    seq_len: int  # tokens per response (prompt + response, padded)
    image_pixels: int  # pixels of each image (0: text only)
    images_per_micro_batch: Optional[int] = None  # distinct images (a prompt's rows share one); None: one per row
    micro_batches: int = 1_000_000  # micro-batches per optimizer step on one DP rank (caps in_flight)
    recompute: bool = False
    sequence_parallel: bool = False
    flash_attention: bool = True  # TE / flash attention: no [s, s] scores are stored
    freeze_vision: bool = False
    params_bytes: int = 2
    distributed_optimizer: bool = True
    offload_during_rollout: bool = False
    in_flight: Optional[int] = None  # override the schedule's micro-batches in flight (all stages)


@dataclass(frozen=True)
class RolloutShapes:
    """The colocated vLLM engine (``RolloutConfig``)."""

    tp: int
    gpu_memory_utilization: float
    max_model_len: int
    image_pixels: int
    enforce_eager: bool = False
    sleep_mode: bool = True  # False: the engine keeps its memory while the policy trains
    sleep_level: int = 2
    kv_cache_memory_bytes: Optional[int] = None
    max_num_batched_tokens: Optional[int] = None  # None: vLLM's default for the GPU (LLM class)
    max_num_seqs: Optional[int] = None


@dataclass(frozen=True)
class PhaseMemory:
    """Named byte counts of one phase on one rank, in the order they are printed."""

    items: tuple[tuple[str, int], ...]

    @property
    def total(self) -> int:
        return sum(v for _, v in self.items)

    def __getitem__(self, name: str) -> int:
        return dict(self.items)[name]

    def total_without(self, *names: str) -> int:
        """The total less some items (e.g. ``"reserve"`` against ``torch.cuda.max_memory_allocated``)."""
        return self.total - sum(v for k, v in self.items if k in names)


@dataclass(frozen=True)
class EnginePlan:
    tp: int
    budget: int
    weights: int
    activations: int
    kv_cache: int
    kv_bytes_per_token: int
    max_model_len: int
    cuda_graphs: int  # its CUDA-graph pool, outside the budget, kept while asleep
    asleep: int  # what the engine keeps on the GPU while the policy trains (besides the graphs)

    @property
    def kv_tokens(self) -> int:
        return max(self.kv_cache, 0) // self.kv_bytes_per_token


@dataclass(frozen=True)
class StagePlan:
    stage: int
    layers: int  # decoder layers on the stage
    params: int  # parameters on one GPU of the stage
    in_flight: int  # micro-batches (model-chunk micro-batches when interleaved) with stored activations
    training: PhaseMemory
    rollout: PhaseMemory
    host: PhaseMemory


@dataclass(frozen=True)
class MemoryPlan:
    shape: ModelShape
    layout: ParallelLayout
    gpu: Gpu
    train: TrainShapes
    engine: EnginePlan
    stages: tuple[StagePlan, ...]
    problems: tuple[str, ...] = field(default=())
    reserve: Reserve = field(default_factory=Reserve)
    stage_flops: tuple = field(default=())  # flops.StageFlops per stage (a config's plan at PP > 1), for the report

    @property
    def communicators(self) -> int:
        """NCCL communicators of more than one rank that the reserve counts."""
        return communicators(self.layout, self.engine.tp, self.shape.tie_embeddings)

    @property
    def fits(self) -> bool:
        return not self.problems


# ------------------------------------------------------------------------------------ formulas

def layer_activation_bytes(s: int, b: int, h: int, heads: int, kv_heads: int, ffn: int, tp: int = 1,
                           sp: bool = False, flash: bool = True, gated: bool = True, dropout: bool = False) -> float:
    """Activations one transformer layer stores for the backward, 16-bit, one micro-batch of ``b``
    sequences of ``s`` tokens (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", section 4), generalised to grouped-query attention, a gated MLP of width
    ``ffn`` and no dropout. In units of ``s b h`` bytes:

        replicated over TP (divided by t only with sequence parallelism):
            2 + 2   attention norm input, QKV input     2 + 2   MLP norm input, fc1 input
            1 + 1   the two dropout masks (dropout only)
        divided by t:
            2 + 4 g/a   Q, and K, V with g of a heads    2   attention output (proj input)
            2 f (x 2 gated)   fc1 output, f = ffn / h     2 f   activation output (fc2 input)
            5 a s / h   scores, softmax, dropout (3 a s / h without dropout; none with flash
                        attention, which keeps a 4 a / h fp32 log-sum-exp instead)

    For GPT (g = a, f = 4, GELU, dropout, unfused attention) this is the paper's ``sbh(10 + 24/t +
    5as/(ht))``, and ``sbh(34/t + 5as/(ht))`` with sequence parallelism.
    """
    replicated = 8 + (2 if dropout else 0)
    f = ffn / h
    divided = 2 + 4 * kv_heads / heads + 2 + 2 * f * (2 if gated else 1) + 2 * f
    if flash:
        divided += 4 * heads / h
    else:
        divided += (5 if dropout else 3) * heads * s / h
    per_sbh = replicated / (tp if sp else 1) + divided / tp
    return s * b * h * per_sbh


def layer_input_bytes(s: int, b: int, h: int, tp: int = 1, sp: bool = False) -> float:
    """What a fully recomputed layer keeps: its 16-bit input ``[s, b, h]`` (sharded with SP)."""
    return 2 * s * b * h / (tp if sp else 1)


def vision_activation_bytes(v: VisionShape, recompute: bool, frozen: bool = False) -> tuple[int, int]:
    """``(stored, transient)`` bytes per image patch in the HF vision tower, bf16 (flash attention).

    Per block (c hidden, J MLP width): RMSNorm keeps its fp32 input and normalised output plus the
    linear's input (8 c, twice), qkv output 6 c (V is a view of it), rotated Q, K 4 c, attention
    output 2 c, the SwiGLU gate, SiLU, up and product 8 J: ``28 c + 8 J`` (65 KB at c = 1280, J = 3420).
    Outside the blocks: the merger 12 c, the patches in bf16 (saved by the patch embedding) and fp32
    (``2 + 4`` B x 3 x 2 x 14^2), the uint8 image (3 x 14^2), the fp32 rotary cos/sin (2 x 4 x c / heads).
    With ``recompute`` a block keeps its input (2 c) and one block is rebuilt at a time (the transient);
    a frozen tower stores nothing (it runs under no grad).
    """
    c, j = v.hidden_size, v.intermediate_size
    block = 28 * c + 8 * j
    patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
    outside = 12 * c + (2 + 4) * patch + v.in_channels * v.patch_size ** 2 + 2 * 4 * (c // v.num_heads)
    if frozen:
        return 0, block
    if recompute:
        return v.depth * 2 * c + outside, block
    return v.depth * block + outside, 0


def image_patches(pixels: int, v: VisionShape, max_tokens: Optional[int] = None) -> int:
    """Patches of an image of ``pixels`` (14 x 14 each), capped so its tokens (patches / 4) fit
    ``max_tokens`` (longer prompts are skipped)."""
    patches = pixels // v.pixels_per_patch
    if max_tokens is not None:
        patches = min(patches, max_tokens * v.patches_per_token)
    return patches


def logits_bytes(tokens: int, vocab_size: int, tp: int) -> int:
    """Vocab-parallel log-softmax over ``[tokens, V / tp]``: ``LOGITS_BYTES_PER_ELEMENT`` per element."""
    return tokens * math.ceil(vocab_size / tp) * LOGITS_BYTES_PER_ELEMENT


def kv_bytes_per_token(shape: ModelShape, rollout_tp: int) -> int:
    """vLLM's KV cache per token per GPU: layers x (K, V) x kv heads per rank (at least 1: vLLM
    replicates them when TP exceeds them) x head_dim x 2 B."""
    return shape.num_layers * 2 * max(shape.num_kv_heads // rollout_tp, 1) * shape.head_dim * 2


def in_flight_micro_batches(pp: int, stage: int, micro_batches: int, vpp: Optional[int] = None) -> int:
    """Micro-batches whose activations stage ``stage`` holds at its peak: ``PP - stage`` under 1F1B;
    Megatron's interleaved warm-up ``2 (PP - stage - 1) + (vpp - 1) PP``, + 1, in model-chunk
    micro-batches (each over 1/vpp of the stage's layers). Never more than there are."""
    if not vpp:
        return min(pp - stage, micro_batches)
    return min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, micro_batches * vpp)


def first_chunk_in_flight(pp: int, vpp: Optional[int], chunk_micro_batches: int) -> int:
    """Distinct micro-batches with live first-chunk (vision tower) activations on stage 0, given
    its ``chunk_micro_batches`` in flight: forward k of the interleaved schedule runs chunk
    ``(k // pp) % vpp`` of micro-batch ``(k // (pp vpp)) pp + k % pp``."""
    if not vpp:
        return chunk_micro_batches
    return sum(1 for k in range(chunk_micro_batches) if (k // pp) % vpp == 0)


def engine_activation_bytes(shape: ModelShape, tp: int, tokens: int, seqs: int, patches: int) -> int:
    """vLLM's profiled peak besides weights and KV cache (forward only, bf16): ``tokens`` through a
    layer (residual, norm, attention in/out, QKV, SwiGLU gate/up and output: ``2 (4 h + (a + 2g) d / t
    + 3 I / t)`` B per token), the sampler over ``seqs`` rows of fp32 logits (``SAMPLER_COPIES``) and
    the vision encoder on one largest image (``2 (4 c + 3 J / t)`` B per patch)."""
    h, v = shape.hidden_size, shape.vision
    qkv = (shape.num_heads + 2 * shape.num_kv_heads) * shape.head_dim
    decoder = tokens * 2 * (4 * h + qkv / tp + 3 * shape.ffn_hidden_size / tp)
    sampler = seqs * shape.vocab_size * 4 * SAMPLER_COPIES
    encoder = patches * 2 * (4 * v.hidden_size + 3 * v.intermediate_size / tp)
    return int(decoder + sampler + encoder)


def group_size(cfg) -> int:
    """Responses per prompt in a step: ``rollout.n`` per image view generated on (the original and
    each extra view of ``algorithm.rollout_methods``, e.g. NoisyRollout's noisy copy)."""
    from megatron_vgpo.methods import ROLLOUT_METHODS

    return cfg.rollout.n * (1 + sum(ROLLOUT_METHODS[name].num_views for name in cfg.algorithm.rollout_methods))


def distinct_images(micro_batch_size: int, n: int) -> int:
    """Most distinct images in a micro-batch: the rows of a prompt (``n`` responses, one image) are
    adjacent and whole on a data-parallel rank, and micro-batches of ``b`` rows start at multiples of
    ``b``, so micro-batch ``k`` spans the groups of rows ``k b`` to ``(k + 1) b - 1``."""
    b = micro_batch_size
    return max(((k + 1) * b - 1) // n - (k * b) // n + 1 for k in range(n))


def vllm_defaults(gpu: Gpu) -> tuple[int, int]:
    """vLLM's ``(max_num_batched_tokens, max_num_seqs)`` for the ``LLM`` class: (16384, 1024) on
    GPUs of >= 70 GiB (A100 excepted), (8192, 256) otherwise."""
    big = gpu.gib >= 70 and "a100" not in gpu.name.lower()
    return (16384, 1024) if big else (8192, 256)


# ------------------------------------------------------------------------------- per stage

def stage_layers(shape: ModelShape, layout: ParallelLayout, stage: int) -> int:
    """Decoder layers of ``stage``: the even share, or the uneven split's count (``layout.split``,
    resolved: ``flops.resolve_split`` turns 'auto' into counts)."""
    return layout.stage_layers(shape.num_layers)[stage]


def stage_params(shape: ModelShape, layout: ParallelLayout, stage: int) -> tuple[int, int]:
    """``(decoder + embedding + output params, vision params)`` on one GPU of ``stage``."""
    tp, last = layout.tp, stage == layout.pp - 1
    lm = stage_layers(shape, layout, stage) * decoder_layer_params(shape, tp)
    vision = 0
    if stage == 0:
        lm += embedding_params(shape, tp)
        vision = vision_params(shape.vision)
    if last:
        lm += shape.hidden_size  # final norm
        if not shape.tie_embeddings or layout.pp > 1:  # tied + PP > 1: the last stage keeps a copy
            lm += embedding_params(shape, tp)
    return lm, vision


def optimizer_bytes(trainable: int, dp: int, train: TrainShapes) -> int:
    """Adam m, v (fp32) and, for 16-bit weights, fp32 master weights: 12 B (8 B) per trainable
    parameter, divided over DP by the distributed optimizer."""
    per_param = 8 + (4 if train.params_bytes < 4 else 0)
    return trainable * per_param // (dp if train.distributed_optimizer else 1)


def communicators(layout: ParallelLayout, rollout_tp: int, tied: bool) -> int:
    """Communicators a rank joins (trainer TP, PP, DP, the world, the engine's TP, the tied-embedding
    group), counting those of more than one rank (at least one)."""
    groups = [layout.tp, layout.pp, layout.dp, layout.world_size, rollout_tp, layout.pp if tied else 1]
    return max(1, sum(1 for size in groups if size > 1))


def _phase(shape: ModelShape, layout: ParallelLayout, train: TrainShapes, stage: int, resident: bool,
           activations: tuple[int, int, int], engine: Optional[EnginePlan], engine_bytes: int,
           reserve: Reserve) -> PhaseMemory:
    """The columns both phases share; ``resident``: grads and optimizer states are on the GPU."""
    lm, vision = stage_params(shape, layout, stage)
    trainable = lm + (0 if train.freeze_vision else vision)
    tensors = (
        ("weights", (lm + vision) * train.params_bytes), ("grads fp32", resident * trainable * 4),
        ("optimizer", resident * optimizer_bytes(trainable, layout.dp, train)),
        ("decoder act", activations[0]), ("vision act", activations[1]), ("logits", activations[2]),
    )
    trainer = sum(v for _, v in tensors)
    rollout_tp = engine.tp if engine else 1
    return PhaseMemory(tensors + (
        ("vLLM engine", engine_bytes), ("CUDA graphs", engine.cuda_graphs if engine else 0),
        ("reserve", _reserve(reserve, layout, rollout_tp, shape.tie_embeddings, trainer)),
    ))


def training_activations(shape: ModelShape, layout: ParallelLayout, train: TrainShapes,
                         stage: int) -> tuple[int, int, int]:
    """``(decoder, vision tower, logits)`` activation bytes of one rank of ``stage`` at the peak of
    the PPO update: the micro-batches in flight, plus one layer's (one block's) backward working set."""
    tp, last = layout.tp, stage == layout.pp - 1
    chunk_flight = train.in_flight or in_flight_micro_batches(layout.pp, stage, train.micro_batches, layout.vpp)
    chunk_layers = stage_layers(shape, layout, stage) // (layout.vpp or 1)
    s, b, h, sp = train.seq_len, train.micro_batch_size, shape.hidden_size, train.sequence_parallel
    full = layer_activation_bytes(s, b, h, shape.num_heads, shape.num_kv_heads, shape.ffn_hidden_size, tp, sp,
                                  train.flash_attention)
    stored = layer_input_bytes(s, b, h, tp, sp) if train.recompute else full
    decoder = chunk_flight * chunk_layers * stored + full
    if last:
        decoder += 2 * layer_input_bytes(s, b, h, tp, sp)  # final norm and output layer inputs
    vision = 0
    if stage == 0 and train.image_pixels:
        per_patch, transient = vision_activation_bytes(shape.vision, train.recompute, train.freeze_vision)
        patches = (train.images_per_micro_batch or b) * image_patches(train.image_pixels, shape.vision)
        images_in_flight = train.in_flight or first_chunk_in_flight(layout.pp, layout.vpp, chunk_flight)
        vision = images_in_flight * patches * per_patch + patches * transient
    logits = logits_bytes(s * b, shape.vocab_size, tp) if last else 0
    scale = train.params_bytes / 2  # the formulas count 16-bit activations
    return int(decoder * scale), int(vision * scale), logits


def training_memory(shape: ModelShape, layout: ParallelLayout, train: TrainShapes, stage: int,
                    engine: Optional[EnginePlan] = None, reserve: Reserve = Reserve()) -> PhaseMemory:
    """GPU bytes of one rank of ``stage`` at its training peak (the PPO update's backward), next to
    a sleeping ``engine`` (None: no engine on the GPU)."""
    return _phase(shape, layout, train, stage, True, training_activations(shape, layout, train, stage), engine,
                  engine.asleep if engine else 0, reserve)


def rollout_memory(shape: ModelShape, layout: ParallelLayout, train: TrainShapes, stage: int, engine: EnginePlan,
                   reserve: Reserve = Reserve()) -> PhaseMemory:
    """GPU bytes of one rank of ``stage`` while the engine generates: the training state that stays
    (weights always; grads and optimizer states unless offloaded), the engine's budget, its CUDA graphs."""
    return _phase(shape, layout, train, stage, not train.offload_during_rollout, (0, 0, 0), engine, engine.budget,
                  reserve)


def _reserve(reserve: Reserve, layout: ParallelLayout, rollout_tp: int, tied: bool, trainer_bytes: int) -> int:
    fixed = reserve.cuda_context_gib + reserve.nccl_gib_per_communicator * communicators(layout, rollout_tp, tied)
    return int(fixed * GiB + reserve.fragmentation * trainer_bytes)


def engine_plan(shape: ModelShape, rollout: RolloutShapes, gpu: Gpu, reserve: Reserve = Reserve()) -> EnginePlan:
    """The engine's budget and its split (vLLM: budget = utilisation x total memory; KV cache =
    budget - weights - profiled activation peak; or ``kv_cache_memory_bytes`` when set)."""
    tokens, seqs = vllm_defaults(gpu)
    tokens = rollout.max_num_batched_tokens or tokens
    seqs = rollout.max_num_seqs or seqs
    weights = total_params(shape) * 2 // rollout.tp
    patches = image_patches(rollout.image_pixels, shape.vision)
    activations = engine_activation_bytes(shape, rollout.tp, tokens, seqs, patches)
    if rollout.kv_cache_memory_bytes is not None:
        kv = rollout.kv_cache_memory_bytes
        budget = weights + activations + kv
    else:
        budget = int(rollout.gpu_memory_utilization * gpu.capacity)
        kv = budget - weights - activations
    graphs = 0 if rollout.enforce_eager else int(reserve.cuda_graphs_gib * GiB)
    asleep = int(reserve.engine_asleep_gib * GiB) if rollout.sleep_mode else budget
    return EnginePlan(rollout.tp, budget, weights, activations, kv, kv_bytes_per_token(shape, rollout.tp),
                      rollout.max_model_len, graphs, asleep)


def host_memory(shape: ModelShape, layout: ParallelLayout, train: TrainShapes, stage: int, engine: EnginePlan,
                rollout_batch_size: int, host_copy: bool = False, reserve: Reserve = Reserve()) -> PhaseMemory:
    """Host RAM of one rank: the process, vLLM's multimodal cache, the rollout images (first stage:
    its DP share of the prompts, uint8 RGB), the offloaded optimizer states (the grad buffers are
    freed, not copied), and the engine's weights while asleep at level 1 (``host_copy``)."""
    lm, vision = stage_params(shape, layout, stage)
    trainable = lm + (0 if train.freeze_vision else vision)
    offloaded = optimizer_bytes(trainable, layout.dp, train) if train.offload_during_rollout else 0
    images = math.ceil(rollout_batch_size / layout.dp) * train.image_pixels * 3 if stage == 0 else 0
    return PhaseMemory((
        ("process", int(reserve.host_process_gib * GiB)), ("vLLM mm cache", int(VLLM_MM_CACHE_GIB * GiB)),
        ("images", images), ("offloaded", offloaded),
        ("engine weights", engine.weights if host_copy else 0),
    ))


def plan_memory(shape: ModelShape, layout: ParallelLayout, train: TrainShapes, rollout: RolloutShapes, gpu: Gpu,
                rollout_batch_size: int = 0, reserve: Reserve = Reserve()) -> MemoryPlan:
    """Both phases on every stage, and whether they fit ``gpu``."""
    engine = engine_plan(shape, rollout, gpu, reserve)
    stages, problems = [], []
    for p in range(layout.pp):
        training = training_memory(shape, layout, train, p, engine, reserve)
        roll = rollout_memory(shape, layout, train, p, engine, reserve)
        host = host_memory(shape, layout, train, p, engine, rollout_batch_size,
                           rollout.sleep_mode and rollout.sleep_level == 1, reserve)
        stages.append(StagePlan(p, stage_layers(shape, layout, p), sum(stage_params(shape, layout, p)),
                                train.in_flight or in_flight_micro_batches(layout.pp, p, train.micro_batches,
                                                                           layout.vpp),
                                training, roll, host))
        for phase, mem in (("training", training), ("rollout", roll)):
            if mem.total > gpu.capacity:
                problems.append(f"stage {p} {phase}: {mem.total / GiB:.1f} GiB > {gpu.describe()}")
    if engine.kv_tokens < engine.max_model_len:
        problems.append(f"vLLM KV cache holds {engine.kv_tokens} tokens < one max-length sequence "
                        f"({engine.max_model_len}): the engine would refuse to start")
    return MemoryPlan(shape, layout, gpu, train, engine, tuple(stages), tuple(problems), reserve)


# ------------------------------------------------------------------------------- from a config

def plan_from_config(cfg, layout: ParallelLayout, gpu: Gpu, shape: ModelShape,
                     reserve: Reserve = Reserve()) -> MemoryPlan:
    """The plan of a validated ``Config`` under ``layout`` (the worst case: every response at the
    maximum length, every image at ``data.max_pixels`` or the most a prompt can hold); an 'auto'
    pipeline split is resolved first (``flops.resolve_split``; the plan's ``layout`` is the resolved one)."""
    from megatron_vgpo.planning.flops import resolve_split  # flops builds on this module

    layout = resolve_split(cfg, layout, shape)
    ro, data, tr = cfg.rollout, cfg.data, cfg.trainer
    max_patches = image_patches(data.max_pixels, shape.vision, ro.max_prompt_length)
    pixels = max_patches * shape.vision.pixels_per_patch
    group = group_size(cfg)
    responses, b = tr.global_batch_size * group, tr.micro_batch_size
    train = TrainShapes(
        micro_batch_size=tr.micro_batch_size, seq_len=ro.max_prompt_length + ro.max_response_length,
        image_pixels=pixels, images_per_micro_batch=distinct_images(b, group),
        micro_batches=math.ceil(responses / layout.dp / tr.micro_batch_size),
        recompute=cfg.model.recompute_activations, sequence_parallel=cfg.parallel.sequence_parallel,
        flash_attention=cfg.model.attention_backend != "local", freeze_vision=cfg.model.freeze_vision,
        params_bytes=2 if cfg.model.params_dtype != "float32" else 4,
        distributed_optimizer=cfg.optimizer.use_distributed_optimizer,
        offload_during_rollout=cfg.optimizer.offload_during_rollout)
    rollout = RolloutShapes(
        tp=ro.tensor_model_parallel_size, gpu_memory_utilization=ro.gpu_memory_utilization,
        max_model_len=ro.max_prompt_length + ro.max_response_length, image_pixels=pixels,
        enforce_eager=ro.enforce_eager, sleep_mode=ro.enable_sleep_mode, sleep_level=ro.sleep_level,
        kv_cache_memory_bytes=ro.kv_cache_memory_bytes)
    return plan_memory(shape, layout, train, rollout, gpu, data.rollout_batch_size, reserve)
