"""Cross-field rules of the config tree: what no single field's type can say.

Each rule raises ``ConfigError`` naming the field(s), the bad value(s) and what is allowed. Ranges
of a component's own hyper-parameters live with the component (e.g. ``VGPOConfig.__post_init__``);
the rules here are about one section against another, or about the world size.
"""

from __future__ import annotations

import signal

from megatron_vgpo.config.loader import ConfigError
from megatron_vgpo.distributed.layout import ParallelLayout, parallel_layout


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _positive(cfg, paths: list[str]) -> None:
    for path in paths:
        value = cfg
        for key in path.split("."):
            value = getattr(value, key)
        _require(value > 0, f"{path}={value!r} is invalid: must be > 0")


def _pipeline_split_rules(par) -> None:
    """``parallel.first_stage_layers`` / ``last_stage_layers``: what can be said without the model (the
    counts against its layers are checked by ``distributed.layout.PipelineSplit`` where the model is known)."""
    pp, vpp = par.pipeline_model_parallel_size, par.virtual_pipeline_model_parallel_size
    for name in ("first_stage_layers", "last_stage_layers"):
        count = getattr(par, name)
        if count is None or count == "auto":  # 'auto' at PP 1 is the only split there is
            continue
        _require(count >= 1, f"parallel.{name}={count} is invalid: must be >= 1, 'auto' or null")
        _require(pp >= 2, f"parallel.{name}={count} needs parallel.pipeline_model_parallel_size >= 2 (got {pp}); "
                          f"set it to null or 'auto'")
        _require(vpp is None or count % vpp == 0,
                 f"parallel.{name}={count} is not divisible by parallel.virtual_pipeline_model_parallel_size={vpp} "
                 f"(Megatron gives each model chunk of the stage the same number of layers)")


def validate(cfg, world_size: int | None = None) -> ParallelLayout | None:
    """Check ``cfg`` (a ``Config``); with ``world_size`` also check and return the parallel layout."""
    _positive(cfg, [
        "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size", "parallel.timeout_minutes",
        "rollout.n", "rollout.tensor_model_parallel_size", "rollout.max_prompt_length",
        "rollout.max_response_length", "rollout.weight_sync_bucket_mb", "optimizer.lr", "optimizer.adam_eps",
        "data.min_pixels", "data.max_pixels", "data.rollout_batch_size", "reward.timeout_s", "reward.num_workers",
        "checkpoint.keep_last", "logging.log_interval", "trainer.total_steps", "trainer.global_batch_size",
        "trainer.micro_batch_size", "algorithm.ppo_epochs", "algorithm.adv_eps",
        "algorithm.dynamic_sampling.max_batches", "algorithm.overlong.buffer_length",
        "trainer.format_warmup.batch_size", "trainer.format_warmup.lr",
    ])
    par, alg, ro, data, opt = cfg.parallel, cfg.algorithm, cfg.rollout, cfg.data, cfg.optimizer
    vpp = par.virtual_pipeline_model_parallel_size
    _require(vpp is None or (vpp >= 2 and par.pipeline_model_parallel_size >= 2),
             f"parallel.virtual_pipeline_model_parallel_size={vpp!r} is invalid: needs >= 2 chunks and "
             f"parallel.pipeline_model_parallel_size >= 2 (got {par.pipeline_model_parallel_size}); or null")
    _pipeline_split_rules(par)
    _require(not par.sequence_parallel or par.tensor_model_parallel_size > 1,
             "parallel.sequence_parallel=true needs parallel.tensor_model_parallel_size > 1")
    _require(0 <= alg.clip_ratio_low < 1, f"algorithm.clip_ratio_low={alg.clip_ratio_low} is invalid: must be in [0, 1)")
    _require(alg.clip_ratio_high >= 0, f"algorithm.clip_ratio_high={alg.clip_ratio_high} is invalid: must be >= 0")
    _require(alg.clip_ratio_c is None or alg.clip_ratio_c > 1,
             f"algorithm.clip_ratio_c={alg.clip_ratio_c} is invalid: the dual-clip bound must be > 1, or null")
    _require(alg.kl_coef >= 0 and alg.entropy_coef >= 0,
             f"algorithm.kl_coef={alg.kl_coef} / algorithm.entropy_coef={alg.entropy_coef}: must be >= 0")
    try:
        from megatron_vgpo.methods import build_methods

        methods = build_methods(alg)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    group = methods.group_size(ro.n)
    _require(not methods.current_shapers or cfg.trainer.micro_batch_size % group == 0,
             f"algorithm.hidden_states_from=current needs group-aligned update micro-batches (a shaper's "
             f"per-group factor sees the whole group): trainer.micro_batch_size={cfg.trainer.micro_batch_size} "
             f"must be a multiple of the group size {group} (rollout.n={ro.n}"
             f"{f' x {group // ro.n} image views of algorithm.rollout_methods' if group != ro.n else ''})")
    _require(opt.max_consecutive_nonfinite >= 1,
             f"optimizer.max_consecutive_nonfinite={opt.max_consecutive_nonfinite}: must be >= 1")
    bad = [s for s in cfg.trainer.stop_signals if not (isinstance(s, str) and isinstance(getattr(signal, s, None),
                                                                                     signal.Signals))]
    _require(not bad, f"trainer.stop_signals: {bad} are not signal names (e.g. SIGTERM, SIGUSR1)")
    _require(ro.n >= 2, f"rollout.n={ro.n} is invalid: group-relative advantages need >= 2 responses per prompt")
    _require(ro.sampling.temperature >= 0, f"rollout.sampling.temperature={ro.sampling.temperature}: must be >= 0")
    _require(0 < ro.sampling.top_p <= 1, f"rollout.sampling.top_p={ro.sampling.top_p}: must be in (0, 1]")
    _require(not alg.overlong.enable or alg.overlong.buffer_length <= ro.max_response_length,
             f"algorithm.overlong.buffer_length={alg.overlong.buffer_length} exceeds "
             f"rollout.max_response_length={ro.max_response_length}")
    _require(data.min_pixels <= data.max_pixels,
             f"data.min_pixels={data.min_pixels} exceeds data.max_pixels={data.max_pixels}")
    _require(data.rollout_batch_size % cfg.trainer.global_batch_size == 0,
             f"data.rollout_batch_size={data.rollout_batch_size} must be a multiple of "
             f"trainer.global_batch_size={cfg.trainer.global_batch_size} (PPO mini-batches per rollout batch)")
    _require(0 <= opt.min_lr <= opt.lr, f"optimizer.min_lr={opt.min_lr} must be in [0, optimizer.lr={opt.lr}]")
    _require(opt.clip_grad >= 0, f"optimizer.clip_grad={opt.clip_grad}: must be >= 0 (0 disables clipping)")
    _require(cfg.trainer.format_warmup.steps >= 0,
             f"trainer.format_warmup.steps={cfg.trainer.format_warmup.steps}: must be >= 0 (0 disables it)")
    _require(opt.lr_warmup_steps >= 0, f"optimizer.lr_warmup_steps={opt.lr_warmup_steps}: must be >= 0")
    _require(0 <= cfg.reward.format_weight <= 1,
             f"reward.format_weight={cfg.reward.format_weight} is invalid: must be in [0, 1]")
    _require(not cfg.reward.custom_fn or ":" in cfg.reward.custom_fn,
             f"reward.custom_fn={cfg.reward.custom_fn!r} is invalid: expected 'module:function'")
    if world_size is None:
        return None
    try:
        layout = parallel_layout(par, world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    # Each PPO mini-batch's groups are shared over the DP ranks (a group never splits): every rank
    # needs at least one. A short last micro-batch is fine.
    _require(cfg.trainer.global_batch_size >= layout.dp,
             f"trainer.global_batch_size={cfg.trainer.global_batch_size} prompts per mini-batch cannot be shared "
             f"over DP = {layout.dp} data-parallel ranks (needs >= {layout.dp})")
    _require(not cfg.trainer.format_warmup.steps or cfg.trainer.format_warmup.batch_size >= layout.dp,
             f"trainer.format_warmup.batch_size={cfg.trainer.format_warmup.batch_size} prompts cannot be shared "
             f"over DP = {layout.dp} data-parallel ranks (needs >= {layout.dp})")
    _pipeline_split_fits_model(cfg, layout)
    return layout


def _pipeline_split_fits_model(cfg, layout: ParallelLayout) -> None:
    """An uneven split against the model's layers (Megatron's rules, ``PipelineSplit.stage_layers``),
    'auto' resolved by the FLOP model on the way, when the model's shapes are known here (its
    config.json, or a released size in ``model.hf_path``); otherwise the builder checks it."""
    from megatron_vgpo.planning.architectures import ArchitectureError, resolve_shape
    from megatron_vgpo.planning.flops import resolve_split

    if layout.split.is_even or layout.pp == 1:
        return
    try:
        shape = resolve_shape(cfg.model.hf_path)
    except ArchitectureError:
        return
    try:
        resolve_split(cfg, layout, shape).stage_layers(shape.num_layers)
    except ValueError as e:
        raise ConfigError(str(e)) from None
