"""Build this rank's Qwen2.5-VL model chunk(s) from an HF config, a ``ModelConfig`` and the groups.

    groups = init_parallel(cfg.parallel)
    layout = resolve_split(cfg, parallel_layout(cfg.parallel, world_size), shape_from_hf_config(hf_config))
    chunks = build_policy(hf_config, cfg.model, groups, layout.split)   # one chunk, or vpp chunks
    load_hf_weights(chunks, cfg.model.hf_path)                           # loading.py

``split`` (``distributed.layout.PipelineSplit``) gives the first and last pipeline stages their own
number of decoder layers (Megatron's uneven stages; ``planning.flops.resolve_split`` turns
``parallel.first_stage_layers: auto`` into the FLOP model's choice); the default is the even split.

Layer spec: Transformer-Engine's when it is importable (``model.attention_backend`` 'auto' or 'te'),
Megatron's local spec otherwise (CPU machines, or 'local'). The spec decides parameter names (TE
fuses the pre-attention and pre-MLP norms into ``linear_qkv`` / ``linear_fc1``), which ``QwenVLArch``
records for the name mapping.
"""

from __future__ import annotations

from megatron_vgpo.distributed.cpu_compat import apply_cpu_compat
from megatron_vgpo.distributed.layout import PipelineSplit
from megatron_vgpo.models.qwen2_5_vl.config import arch_from_hf, transformer_config
from megatron_vgpo.utils.deps import has, require


def use_te_spec(attention_backend: str) -> bool:
    """Whether the Transformer-Engine layer spec is used for ``model.attention_backend``."""
    if attention_backend == "te":
        require("transformer_engine", "model.attention_backend=te")
        return True
    return attention_backend == "auto" and has("transformer_engine")


def layer_spec(te: bool):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if te:
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


def build_policy(hf_config, model_cfg, groups, split: PipelineSplit = PipelineSplit(), **config_overrides) -> list:
    """This rank's model chunks: ``[chunk]``, or one per virtual-pipeline stage.

    Args:
        hf_config: a transformers ``Qwen2_5_VLConfig``.
        model_cfg: ``megatron_vgpo.config.schema.ModelConfig`` (dtype, backend, freeze_vision,
            recompute_activations).
        groups: ``ParallelGroups`` from ``init_parallel``.
        split: decoder layers of the first / last pipeline stage (resolved: no 'auto'); default even.
        config_overrides: extra ``TransformerConfig`` fields (tests, experiments).

    Raises ValueError naming the config field when TP does not divide the heads, kv heads or MLP
    width, when the pipeline split does not fit the layers (even: PP x VPP must divide them; see
    ``PipelineSplit.stage_layers``), or on sequence parallelism without Transformer-Engine.
    """
    from megatron_vgpo.models.qwen2_5_vl.model import Qwen25VLChunk

    apply_cpu_compat()
    te = use_te_spec(model_cfg.attention_backend)
    if groups.sequence_parallel and not te:
        raise ValueError("parallel.sequence_parallel=true needs the Transformer-Engine layer spec: Megatron's "
                         "local spec normalises with torch norms, which do not support it; disable it here")
    arch = arch_from_hf(hf_config, groups.tp_size, te_fused_norms=te)
    split.stage_layers(arch.num_layers, groups.pp_size, groups.vpp_size)  # ValueError naming the fields
    config = transformer_config(hf_config, arch, groups, model_cfg.params_dtype,
                                model_cfg.recompute_activations, split, **config_overrides)
    spec = layer_spec(te)
    vp_stages = range(groups.vpp_size) if groups.vpp_size else [None]
    chunks = []
    for vp_stage in vp_stages:
        pre, post = groups.chunk_stages(vp_stage)
        chunk = Qwen25VLChunk(hf_config, config, spec, arch, groups, pre, post, vp_stage,
                              freeze_vision=model_cfg.freeze_vision)
        chunks.append(on_device(chunk, groups.device, config.params_dtype))
    return chunks


def on_device(chunk, device, params_dtype):
    """The chunk on the training device with every floating-point parameter in ``params_dtype``, as
    Megatron-LM's ``get_model`` (``.cuda()``) and ``Float16Module`` (``.bfloat16()``) leave a model: the
    HF vision tower is built on the host, and the local spec's torch norms default to float32. Buffers
    keep their dtype (rotary frequencies stay float32)."""
    chunk.to(device)
    for param in chunk.parameters():
        if param.is_floating_point() and param.dtype != params_dtype:
            param.data = param.data.to(params_dtype)
    return chunk
