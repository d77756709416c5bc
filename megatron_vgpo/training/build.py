"""Assemble a ``Trainer`` from the resolved config: process groups, policy, optimizer, rollout
engine, resharder, data, rewards, logging and checkpoints — each component from its own sub-config.
"""

from __future__ import annotations

import logging

import torch.distributed as dist

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def optimizer_steps_per_rl_step(cfg) -> int:
    """Optimizer steps of a full trainer step: one per PPO mini-batch, per epoch."""
    return cfg.algorithm.ppo_epochs * (cfg.data.rollout_batch_size // cfg.trainer.global_batch_size)


def build_trainer(trainer_cls, cfg, engine=None):
    """The trainer of ``cfg``; ``engine``: a ``RolloutEngine`` to use instead of building the vLLM one
    (tests, other backends)."""
    from transformers import AutoConfig

    from megatron_vgpo.config import dump_yaml
    from megatron_vgpo.data import build_train_loader, build_val_dataset, processor_size_overrides
    from megatron_vgpo.methods import build_methods
    from megatron_vgpo.distributed.layout import parallel_layout
    from megatron_vgpo.distributed.parallel import init_parallel
    from megatron_vgpo.planning import resolve_split, shape_from_hf_config
    from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
    from megatron_vgpo.checkpoint.model_io import load_model_checkpoint
    from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights
    from megatron_vgpo.models.qwen2_5_vl.tiny import load_processor
    from megatron_vgpo.rewards import RewardScorer
    from megatron_vgpo.rollout.data_parallel import RolloutGroups
    from megatron_vgpo.rollout.vllm_engine import VLLMRolloutEngine
    from megatron_vgpo.rollout.weight_sync import WeightResharder
    from megatron_vgpo.training.actor import Actor
    from megatron_vgpo.training.checkpointing import CheckpointManager
    from megatron_vgpo.training.logging import MetricsLogger
    from megatron_vgpo.training.rollout import Rollouts

    if cfg.algorithm.kl_coef > 0:
        raise ValueError(f"algorithm.kl_coef={cfg.algorithm.kl_coef} needs a reference policy, which the trainer "
                         "does not keep yet; the paper (and DAPO) train without a KL term: set it to 0")
    groups = init_parallel(cfg.parallel, cfg.trainer.seed, device=cfg.trainer.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    hf_config = AutoConfig.from_pretrained(cfg.model.hf_path)
    processor = load_processor(cfg.model.hf_path)
    # Data first: a missing column or a file with no usable row stops the run before the model and
    # the engine are built.
    train_loader = build_train_loader(cfg.data, processor, cfg.rollout.max_prompt_length)
    val_set = build_val_dataset(cfg.data, processor, cfg.rollout.max_prompt_length)
    methods = build_methods(cfg.algorithm, processor.tokenizer)
    # Layers per pipeline stage (parallel.first_stage_layers / last_stage_layers; "auto" balances the
    # FLOP model): every rank resolves the same split from the same config.
    split = resolve_split(cfg, parallel_layout(cfg.parallel, world), shape_from_hf_config(hf_config)).split
    chunks = build_policy(hf_config, cfg.model, groups, split)
    if cfg.model.megatron_path:  # converted once (any TP/PP layout), loaded as this run's layout
        load_model_checkpoint(chunks, cfg.model.megatron_path)
    else:
        load_hf_weights(chunks, cfg.model.hf_path)
    actor = Actor(chunks, groups, cfg.optimizer, cfg.trainer.micro_batch_size, cfg.trainer.total_steps,
                  steps_per_rl_step=optimizer_steps_per_rl_step(cfg), device=groups.device)
    actor.offload()  # the engine runs first (no-op unless optimizer.offload_during_rollout)

    if engine is None:
        size = processor_size_overrides(cfg.data.min_pixels, cfg.data.max_pixels)
        # The engine starts from random weights and receives the trainer's at once: one source of truth.
        engine = VLLMRolloutEngine(cfg.rollout, cfg.model.hf_path, dtype=_DTYPES[cfg.model.params_dtype],
                                   load_format="dummy", mm_processor_kwargs=size)
    resharder = WeightResharder(chunks, groups, bucket_bytes=cfg.rollout.weight_sync_bucket_mb << 20,
                                rollout_tp=cfg.rollout.tensor_model_parallel_size)
    scorer = RewardScorer(cfg.reward) if rank == 0 else None
    rollouts = Rollouts(cfg, engine, resharder, processor, train_loader, scorer, groups,
                        RolloutGroups.current(cfg.rollout.tensor_model_parallel_size), methods.rollout)
    rollouts.sync_weights()
    metrics_logger = MetricsLogger(cfg.logging, rank, dump_yaml(cfg), total_steps=cfg.trainer.total_steps)
    checkpoints = CheckpointManager(cfg.checkpoint, rank, world, dp_group=groups.dp_group)
    return trainer_cls(cfg, groups, actor, rollouts, methods, metrics_logger, checkpoints, val_set)
