"""From a Hugging Face Qwen2.5-VL config to the Megatron language-model config, and the shape facts
(``QwenVLArch``) that the name mapping, the loader and the policy model share.

Qwen2.5-VL's language model is a Qwen2 decoder: RMSNorm, SwiGLU MLP, grouped-query attention with a
bias on q/k/v only, rotary embeddings with 3-D "M-RoPE" sections (temporal, height, width), untied
embeddings at 7B/32B/72B and tied at 3B. Everything model-specific that Megatron's ``GPTModel``
needs is read here from the transformers config object, so nothing else looks at HF config fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class QwenVLArch:
    """Shapes of the language model, for one TP size. All sizes are full (unsharded)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # the HF checkpoint's (embedding rows)
    padded_vocab_size: int  # vocab_size rounded up to a multiple of tp_size
    tp_size: int
    tie_embeddings: bool
    te_fused_norms: bool  # TE spec: the pre-attention / pre-MLP norms live inside linear_qkv / linear_fc1

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def padded_vocab_size(vocab_size: int, tp_size: int) -> int:
    """Smallest multiple of ``tp_size`` >= ``vocab_size`` (Megatron shards the vocabulary evenly).

    The released Qwen2.5-VL vocabularies (151936, 152064) are multiples of 8 already; only tiny test
    models get padding rows, which the log-prob computation leaves out."""
    return -(-vocab_size // tp_size) * tp_size


def check_tp_divides(hf_config, tp_size: int) -> None:
    """ValueError naming the config field when TP does not divide the heads, kv heads or MLP width."""
    text = hf_config.text_config
    fields = {
        "text_config.num_attention_heads": text.num_attention_heads,
        "text_config.num_key_value_heads": text.num_key_value_heads,
        "text_config.intermediate_size": text.intermediate_size,
    }
    for name, value in fields.items():
        if value % tp_size:
            raise ValueError(
                f"parallel.tensor_model_parallel_size={tp_size} does not divide {name}={value}: Megatron "
                f"shards whole heads (and kv groups) across TP ranks; pick a TP size that divides it")


def _check_supported(hf_config) -> None:
    text = hf_config.text_config
    if text.hidden_act != "silu":
        raise NotImplementedError(f"text_config.hidden_act={text.hidden_act!r}: only 'silu' (SwiGLU) is "
                                  f"supported")
    if getattr(text, "use_sliding_window", False):
        raise NotImplementedError("text_config.use_sliding_window=true is not supported (no released "
                                  "Qwen2.5-VL uses it)")
    rope_type = rope_parameters(hf_config).get("rope_type", "default")
    if rope_type not in ("default", "mrope"):
        raise NotImplementedError(f"text_config.rope_parameters.rope_type={rope_type!r}: only default "
                                  f"M-RoPE is supported")
    if text.hidden_size % text.num_attention_heads:
        raise ValueError(f"text_config.hidden_size={text.hidden_size} is not divisible by "
                         f"text_config.num_attention_heads={text.num_attention_heads}")


def rope_parameters(hf_config) -> dict:
    """The text rope parameters (transformers 5 ``rope_parameters``; 4.x ``rope_scaling`` + ``rope_theta``)."""
    text = hf_config.text_config
    params = getattr(text, "rope_parameters", None)
    if params is None:  # transformers 4.x config objects
        params = dict(getattr(text, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(text, "rope_theta", 1000000.0))
    return params


def mrope_section(hf_config) -> list[int]:
    """Rotary half-dims given to the temporal, height and width position streams (sum = head_dim / 2)."""
    section = list(rope_parameters(hf_config).get("mrope_section", [16, 24, 24]))  # HF's default
    head_dim = hf_config.text_config.hidden_size // hf_config.text_config.num_attention_heads
    if sum(section) * 2 != head_dim:
        raise ValueError(f"text_config.rope_parameters.mrope_section={section} must sum to "
                         f"head_dim / 2 = {head_dim // 2}")
    return section


def arch_from_hf(hf_config, tp_size: int = 1, te_fused_norms: bool = False) -> QwenVLArch:
    """The shape facts of ``hf_config`` (a transformers ``Qwen2_5_VLConfig``) at TP size ``tp_size``."""
    _check_supported(hf_config)
    check_tp_divides(hf_config, tp_size)
    text = hf_config.text_config
    return QwenVLArch(
        num_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
        ffn_hidden_size=text.intermediate_size, num_heads=text.num_attention_heads,
        num_kv_heads=text.num_key_value_heads, head_dim=text.hidden_size // text.num_attention_heads,
        vocab_size=text.vocab_size, padded_vocab_size=padded_vocab_size(text.vocab_size, tp_size),
        tp_size=tp_size, tie_embeddings=bool(hf_config.tie_word_embeddings), te_fused_norms=te_fused_norms)


def transformer_config(hf_config, arch: QwenVLArch, groups, params_dtype: str = "float32",
                       recompute: bool = False, split=None, **overrides):
    """Megatron ``TransformerConfig`` of the language model under the process groups ``groups``.

    ``split`` (a resolved ``distributed.layout.PipelineSplit``, None: even) sets Megatron's
    ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``; every layer's
    ``layer_number`` stays global under any split (what the loader and checkpoints key on).

    ``variable_seq_lengths`` is on (micro-batches of an RL step have different padded lengths), which
    megatron-core 0.16 only accepts with the ``alltoall`` token dispatcher (unused: no MoE). Fusions
    that need apex/TE, and the fused RoPE kernel (it assumes one position stream, M-RoPE has three
    per batch row), are off. ``calculate_per_token_loss`` is on: the losses of this package arrive
    already aggregated by the algorithm (DAPO's token mean), so the pipeline schedule must not divide
    them by the number of micro-batches. ``overrides`` win over everything (tests, experiments).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_vgpo.distributed.cpu_compat import cpu_model_parallel_overrides

    dtype = DTYPES[params_dtype]
    text = hf_config.text_config
    kwargs = dict(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size, ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads, num_query_groups=arch.num_kv_heads, kv_channels=arch.head_dim,
        normalization="RMSNorm", layernorm_epsilon=text.rms_norm_eps,
        gated_linear_unit=True, activation_func=F.silu, bias_activation_fusion=False,
        add_bias_linear=False, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        mrope_section=mrope_section(hf_config), apply_rope_fusion=False,
        init_method_std=text.initializer_range, attention_softmax_in_fp32=True,
        tensor_model_parallel_size=groups.tp_size, pipeline_model_parallel_size=groups.pp_size,
        virtual_pipeline_model_parallel_size=groups.vpp_size, sequence_parallel=groups.sequence_parallel,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        variable_seq_lengths=True, moe_token_dispatcher_type="alltoall", calculate_per_token_loss=True,
        gradient_accumulation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        persist_layer_norm=False,
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if split is not None and groups.pp_size > 1:  # at PP 1 Megatron would build only the first-stage count
        kwargs.update(split.megatron_fields())
    kwargs.update(cpu_model_parallel_overrides())
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def rotary_base(hf_config) -> float:
    return float(rope_parameters(hf_config).get("rope_theta", 1000000.0))


def max_positions(hf_config) -> Optional[int]:
    return hf_config.text_config.max_position_embeddings
