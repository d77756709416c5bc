"""Checkpoints: Megatron-Core distributed checkpoints of the policy, and HF <-> Megatron conversion.

- ``dist_io``: read and write a ``torch_dist`` checkpoint one chunk at a time (model-agnostic).
- ``hf_io``: read HF safetensors by name; stream bounded safetensors shards + index back out.
- ``qwen2_5_vl``: which global tensors a Qwen2.5-VL checkpoint holds (on top of the model's one
  name mapping, ``models/qwen2_5_vl/name_mapping.py``).
- ``convert``: the two streaming conversions (CLIs in ``checkpoint_conversion/``).
- ``model_io``: load / save this rank's model chunks (training, evaluation).
- ``output_dir``: outputs that appear complete or not at all.
"""
