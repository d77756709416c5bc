"""Qwen2.5-VL as a Megatron-Core policy: model chunk (``model``), builder (``builder``), HF config
translation (``config``), HF <-> Megatron name mapping (``name_mapping``), checkpoint loading
(``loading``), vision tower (``vision``), vocab-parallel log-probs (``vocab_parallel``), M-RoPE
position ids (``rope_index``), the pipeline-schedule wrapper (``pipeline``), the parity batch and
HF reference (``parity``) and the tiny test checkpoint (``tiny``).

Heavy imports (Megatron, transformers models) happen in the submodules, not here.
"""

__all__ = ["build_policy", "load_hf_weights", "PolicyOutput", "Qwen25VLChunk"]


def __getattr__(name):
    # Lazy, so that importing the package (e.g. for name_mapping alone) stays cheap.
    if name == "build_policy":
        from megatron_vgpo.models.qwen2_5_vl.builder import build_policy
        return build_policy
    if name == "load_hf_weights":
        from megatron_vgpo.models.qwen2_5_vl.loading import load_hf_weights
        return load_hf_weights
    if name in ("PolicyOutput", "Qwen25VLChunk"):
        from megatron_vgpo.models.qwen2_5_vl import model
        return getattr(model, name)
    raise AttributeError(name)
