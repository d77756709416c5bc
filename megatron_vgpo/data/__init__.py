"""Prompt data: EasyR1/verl-schema files -> typed ``PromptExample`` batches for the rollout.

    loader = build_train_loader(cfg.data, processor, cfg.rollout.max_prompt_length)
    batch = loader.next_batch()                     # list[PromptExample], rollout_batch_size long
    state = loader.state_dict()                     # checkpointed; loader.load_state_dict(state)
    val = build_val_dataset(cfg.data, processor, cfg.rollout.max_prompt_length)
    for batch in iter_val_batches(val, cfg.data.val_batch_size): ...   # example.source = file name
"""

from megatron_vgpo.data.dataset import NoUsableExamplesError, PromptDataset, PromptExample, SkippedRow, coerce_answer
from megatron_vgpo.data.images import ImageDecodeError, processor_size_overrides, smart_resize
from megatron_vgpo.data.loader import PromptDataLoader, build_train_loader, build_val_dataset, iter_val_batches
from megatron_vgpo.data.prompt import INSTRUCTION, PROMPT_TEMPLATE, SYSTEM_PROMPT, render_prompt
from megatron_vgpo.data.sources import DatasetError, MissingColumnError

__all__ = [
    "DatasetError", "ImageDecodeError", "INSTRUCTION", "MissingColumnError", "NoUsableExamplesError",
    "PROMPT_TEMPLATE", "PromptDataLoader", "PromptDataset", "PromptExample", "SYSTEM_PROMPT", "SkippedRow",
    "build_train_loader", "build_val_dataset", "coerce_answer", "iter_val_batches", "processor_size_overrides",
    "render_prompt", "smart_resize",
]
