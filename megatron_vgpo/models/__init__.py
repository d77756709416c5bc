"""Policy models. One sub-package per model family (``qwen2_5_vl``), each with its own builder and
Hugging Face name mapping (``<family>/name_mapping.py``)."""
