"""A tiny Megatron training loop for the checkpoint tests: GPTModel + DDP + Megatron Adam + LR schedule.

Every random stream a real step uses is exercised, so that a resume which forgets one shows up as a
metric difference: dropout (torch CPU generator, and Megatron's RNG tracker for attention dropout),
and python ``random`` / numpy draws folded into a ``noise`` metric. The LR warms up, so a scheduler
that is not restored changes ``lr``; the data position decides the batch, so a lost position changes
``loss``. Needs Megatron's parallel state (``init_parallel``) first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

VOCAB, SEQ, BATCH = 64, 8, 2


@dataclass
class TinyRun:
    ddp: object  # megatron DistributedDataParallel around the GPTModel
    model: object  # the GPTModel
    optimizer: object
    scheduler: object


class TinyData:
    """Batches drawn from ``(seed, index)`` alone: the position is the whole loader state."""

    def __init__(self, seed: int = 0):
        self.seed, self.index = seed, 0

    def next(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.index)
        self.index += 1
        return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.index = state["seed"], state["index"]


def seed_all(seed: int) -> None:
    """Reset every stream a step draws from (a fresh process of a real run does this at start)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    model_parallel_cuda_manual_seed(seed)  # torch's generator and Megatron's tracker


def build(groups, init_seed: int = 0, dropout: float = 0.1) -> TinyRun:
    """The tiny model on this rank's TP/PP place in ``groups`` (a ``ParallelGroups``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer import TransformerConfig

    from megatron_vgpo.distributed.cpu_compat import apply_cpu_compat, cpu_model_parallel_overrides

    torch.manual_seed(init_seed)
    cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32,
                            params_dtype=torch.float32, pipeline_dtype=torch.float32,
                            hidden_dropout=dropout, attention_dropout=dropout,
                            tensor_model_parallel_size=groups.tp_size,
                            pipeline_model_parallel_size=groups.pp_size, **cpu_model_parallel_overrides())
    model = GPTModel(cfg, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ,
                     pre_process=groups.is_first_stage, post_process=groups.is_last_stage,
                     share_embeddings_and_output_weights=False)
    apply_cpu_compat()
    ddp = DistributedDataParallel(cfg, DistributedDataParallelConfig(use_distributed_optimizer=False), model)
    # clip_grad=0: Megatron's grad clipping asserts CUDA tensors (not covered by cpu_compat in 0.16).
    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, min_lr=1e-3, bf16=False, fp16=False,
                                                       use_distributed_optimizer=False, clip_grad=0.0), [ddp])
    scheduler = OptimizerParamScheduler(optimizer, init_lr=0.0, max_lr=1e-2, min_lr=1e-3, lr_warmup_steps=4,
                                        lr_decay_steps=20, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
                                        wd_incr_steps=20, wd_incr_style="constant")
    return TinyRun(ddp, model, optimizer, scheduler)


def train_step(run: TinyRun, data: TinyData) -> dict[str, float]:
    """One optimiser step on a single-stage (PP = 1) model; returns its metrics."""
    ids = data.next()
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    run.ddp.train()
    run.ddp.zero_grad_buffer()
    run.optimizer.zero_grad()
    loss = run.ddp(ids, positions, None, labels=ids).float().mean()
    loss.backward()
    run.ddp.finish_grad_sync()
    _, grad_norm, _ = run.optimizer.step()
    run.scheduler.step(1)
    noise = random.random() + float(np.random.rand()) + torch.rand(()).item()
    return {"loss": loss.item(), "grad_norm": float(grad_norm), "lr": run.optimizer.param_groups[0]["lr"],
            "noise": noise}


def global_tensors(sharded) -> dict[str, torch.Tensor]:
    """``{key: global tensor}`` assembled from a sharded state dict's ShardedTensors (this rank's
    shards only: complete on a TP = PP = 1 rank)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    out: dict[str, torch.Tensor] = {}
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor):
            full = out.setdefault(sh.key, torch.full(sh.global_shape, float("nan"), dtype=sh.dtype))
            full[_box(sh)] = sh.data.detach().reshape(_box_shape(sh))
    return out


def shard_mismatches(sharded, reference: dict[str, torch.Tensor]) -> list[str]:
    """Keys of this rank's ShardedTensors whose data differ from the same box of ``reference``."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    bad = []
    for sh in nested_values(sharded):
        if isinstance(sh, ShardedTensor):
            expected = reference[sh.key][_box(sh)].reshape(sh.data.shape)
            if not torch.equal(sh.data.detach(), expected):
                bad.append(f"{sh.key}@{sh.global_offset}")
    return bad


def _box_shape(sh) -> tuple[int, ...]:
    return (1,) * sh.prepend_axis_num + tuple(sh.data.shape)


def _box(sh) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(sh.global_offset, _box_shape(sh)))
