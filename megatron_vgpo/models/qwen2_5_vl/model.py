"""One rank's model chunk of the Qwen2.5-VL policy: vision tower (first stage), Megatron ``GPTModel``
decoder with M-RoPE, and on the last stage the per-token log-probs, entropy and final hidden states.

Forward contract (every stage receives the same batch; ``B`` rows of ``L`` tokens, right-padded):

- ``input_ids [B, L]``, ``attention_mask [B, L]`` (1 = token, 0 = right padding; padding must be on
  the right: causal attention then never lets a real token see a pad, so no mask is needed inside
  the decoder), ``pixel_values [N_patches, C*T*P*P]`` and ``image_grid_thw [N_images, 3]`` for the
  images of the whole batch in batch order (or None for a text-only batch). With ``image_index``
  (one entry per image slot of the batch, numbering the distinct images 0, 1, ... in order of first
  use) ``pixel_values`` holds each DISTINCT image once and the slots sharing it reuse its encoding:
  the ``n`` responses of a prompt in one micro-batch run the vision tower once. ``image_grid_thw``
  stays per slot (every stage needs it for the M-RoPE positions).
- The 3-D M-RoPE position ids ``[3, B, L]`` are recomputed from ``input_ids`` / ``image_grid_thw``
  on every stage (``rope_index.get_rope_index``): cheap, and nothing extra crosses the pipeline.
- First stage: word embeddings, with the ``<|image_pad|>`` rows replaced by the vision tower output.
- Intermediate stages: the decoder's hidden states ``[L, B, d]`` (Megatron's layout) are returned for
  the pipeline schedule to send on.
- Last stage: a ``PolicyOutput``. ``logprobs[:, t] = log p(target_ids[:, t] | tokens <= t)``; by
  default ``target_ids`` is ``input_ids`` shifted left by one (the last column then scores a dummy
  token 0 and must be masked by the caller). Log-probs and entropy are computed vocab-parallel
  (``vocab_parallel.py``); ``hidden_states`` is the output of the final RMSNorm, i.e. the input of
  the output layer (HF's ``hidden_states[-1]``), batch-first ``[B, L, d]``.

The chunk composes GPTModel's public parts (``embedding``, ``rotary_pos_emb``, ``decoder``,
``output_layer``) instead of calling ``GPTModel.forward``, because that returns only logits or a loss
and we need the normed hidden states of the same pass too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from megatron.core import tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import ModelType
from megatron.core.transformer.module import MegatronModule

from megatron_vgpo.models.qwen2_5_vl.rope_index import get_rope_index
from megatron_vgpo.models.qwen2_5_vl.vision import (
    build_vision_tower,
    distinct_image_grids,
    features_per_slot,
    image_features,
    merge_image_features,
)
from megatron_vgpo.models.qwen2_5_vl.vocab_parallel import vocab_parallel_logprobs


@dataclass
class PolicyOutput:
    """Last-stage outputs of one forward pass. All float32 except hidden states (model dtype)."""

    logprobs: torch.Tensor  # [B, L] log p(target_ids[:, t] | tokens <= t)
    entropy: Optional[torch.Tensor]  # [B, L] entropy of the next-token distribution, when asked
    hidden_states: Optional[torch.Tensor]  # [B, L, d] after the final norm, when asked


def shift_left(input_ids: torch.Tensor, fill: int = 0) -> torch.Tensor:
    """``targets[:, t] = input_ids[:, t + 1]``; the last column is ``fill``. ``[B, L] -> [B, L]``."""
    return torch.cat([input_ids[:, 1:], input_ids.new_full((input_ids.shape[0], 1), fill)], dim=1)


def check_right_padded(attention_mask: Optional[torch.Tensor]) -> None:
    if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError("attention_mask has padding before a real token: rows must be right-padded "
                         "(the decoder uses a plain causal mask)")


class Qwen25VLChunk(MegatronModule):
    """This rank's chunk (one per virtual-pipeline stage) of the Qwen2.5-VL policy."""

    def __init__(self, hf_config, config, layer_spec, arch, groups, pre_process: bool, post_process: bool,
                 vp_stage: Optional[int] = None, freeze_vision: bool = False):
        super().__init__(config=config)
        from megatron_vgpo.models.qwen2_5_vl.config import max_positions, rotary_base

        self.hf_config = hf_config
        self.arch = arch
        self.groups = groups
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.model_type = ModelType.encoder_or_decoder
        self.share_embeddings_and_output_weights = arch.tie_embeddings
        self.language_model = GPTModel(
            config=config, transformer_layer_spec=layer_spec, vocab_size=arch.padded_vocab_size,
            max_sequence_length=max_positions(hf_config), pre_process=pre_process, post_process=post_process,
            share_embeddings_and_output_weights=arch.tie_embeddings, position_embedding_type="mrope",
            rotary_base=rotary_base(hf_config), scatter_embedding_sequence_parallel=False,
            pg_collection=groups.pg_collection, vp_stage=vp_stage)
        self.vision = (build_vision_tower(hf_config.vision_config, config.params_dtype, freeze_vision,
                                          recompute=config.recompute_granularity is not None)
                       if pre_process else None)

    # Megatron's schedules and grad finalisation look these up on the (unwrapped) model chunk.
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def position_ids(self, input_ids, image_grid_thw, attention_mask) -> torch.Tensor:
        """``[3, B, L]`` M-RoPE position ids (transformers' ``get_rope_index`` rules)."""
        cfg = self.hf_config
        position_ids, _ = get_rope_index(
            input_ids, image_grid_thw, attention_mask, spatial_merge_size=cfg.vision_config.spatial_merge_size,
            image_token_id=cfg.image_token_id, vision_start_token_id=cfg.vision_start_token_id)
        return position_ids

    def _embed(self, input_ids, pixel_values, image_grid_thw, image_index) -> torch.Tensor:
        embeddings = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [L, B, d]
        if pixel_values is not None:
            if image_index is None:
                features = image_features(self.vision, pixel_values, image_grid_thw)
            else:
                grids = distinct_image_grids(image_grid_thw, image_index)
                features = features_per_slot(image_features(self.vision, pixel_values, grids), grids, image_index,
                                             self.hf_config.vision_config.spatial_merge_size)
            embeddings = merge_image_features(embeddings, input_ids, features, self.hf_config.image_token_id)
        if self.config.sequence_parallel:
            embeddings = tensor_parallel.scatter_to_sequence_parallel_region(embeddings, group=self.groups.tp_group)
        return embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                target_ids: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
                image_index: Optional[Sequence[int]] = None, compute_entropy: bool = False,
                return_hidden_states: bool = True):
        """See the module docstring. Returns ``[L, B, d]`` hidden states on a non-last stage (or
        ``[L / tp, B, d]`` with sequence parallelism), a ``PolicyOutput`` on the last one."""
        check_right_padded(attention_mask)
        if position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw, attention_mask)
        lm = self.language_model
        decoder_input = self._embed(input_ids, pixel_values, image_grid_thw, image_index) if self.pre_process else None
        rotary = lm.rotary_pos_emb(position_ids, lm.mrope_section)
        hidden = lm.decoder(hidden_states=decoder_input, attention_mask=None, rotary_pos_emb=rotary)
        if not self.post_process:
            return hidden
        return self._outputs(hidden, input_ids if target_ids is None else target_ids,
                             shift=target_ids is None, compute_entropy=compute_entropy,
                             return_hidden_states=return_hidden_states)

    def _outputs(self, hidden, targets, shift: bool, compute_entropy: bool, return_hidden_states: bool):
        lm = self.language_model
        weight = lm.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = lm.output_layer(hidden, weight=weight)  # [L, B, V_padded / tp]
        if shift:
            targets = shift_left(targets)
        g = self.groups
        logprobs, entropy = vocab_parallel_logprobs(
            logits, targets.t(), self.arch.vocab_size, g.tp_group, g.tp_rank, g.tp_size, compute_entropy)
        states = None
        if return_hidden_states:
            if self.config.sequence_parallel:
                hidden = tensor_parallel.gather_from_sequence_parallel_region(
                    hidden, tensor_parallel_output_grad=False, group=g.tp_group)
            states = hidden.transpose(0, 1)
        return PolicyOutput(logprobs=logprobs.t(), entropy=None if entropy is None else entropy.t(),
                            hidden_states=states)
