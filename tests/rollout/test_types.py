"""The rollout boundary types and the rollout data-parallel split (no vLLM needed)."""

from __future__ import annotations

import pytest
import torch

from megatron_vgpo.config.schema import RolloutConfig, SamplingConfig
from megatron_vgpo.rollout import RolloutBatch, RolloutGroups, SamplingParams, share
from megatron_vgpo.rollout.vllm_engine import collapse_image_pads


def batch(rows: list[list[int]], first_request: int = 0) -> RolloutBatch:
    return RolloutBatch(request_index=[first_request + i for i in range(len(rows))],
                        prompt_token_ids=[[1, 2]] * len(rows), response_token_ids=rows,
                        response_logprobs=[[-0.5] * len(r) for r in rows],
                        finish_reasons=["stop"] * len(rows))


def test_padded_right_pads_and_masks():
    tokens, logprobs, mask = batch([[5, 6, 7], [8], []]).padded(pad_token_id=9)
    assert tokens.tolist() == [[5, 6, 7], [8, 9, 9], [9, 9, 9]]
    assert logprobs.tolist() == [[-0.5] * 3, [-0.5, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [False] * 3]
    assert tokens.dtype == torch.long and logprobs.dtype == torch.float32
    assert [t.shape for t in RolloutBatch([], [], [], [], []).padded()] == [torch.Size([0, 0])] * 3


def test_batch_fields_must_agree():
    with pytest.raises(ValueError, match="different lengths"):
        RolloutBatch([0, 1], [[1]], [[2]], [[-1.0]], ["stop"])
    with pytest.raises(ValueError, match="response 0: 2 tokens but 1 log-probs"):
        RolloutBatch([0], [[1]], [[2, 3]], [[-1.0]], ["stop"])


def test_concat_offsets_request_indices():
    whole = RolloutBatch.concat([batch([[1], [2]]), batch([[3]])], request_offsets=[0, 2])
    assert whole.request_index == [0, 1, 2] and whole.response_token_ids == [[1], [2], [3]]
    assert whole.response_lengths == [1, 1, 1]


def test_sampling_params_from_config_and_shift():
    cfg = RolloutConfig(n=4, max_response_length=100, val_temperature=0.0,
                        sampling=SamplingConfig(temperature=0.9, top_p=0.8, top_k=20))
    train = SamplingParams.from_rollout_config(cfg, seed=10)
    assert (train.n, train.max_tokens, train.temperature, train.top_p, train.top_k) == (4, 100, 0.9, 0.8, 20)
    val = SamplingParams.from_rollout_config(cfg, validation=True)
    assert (val.n, val.temperature, val.top_p, val.top_k, val.seed) == (1, 0.0, 1.0, -1, None)
    # Request 3 of the whole list has seed 10 + 3 * 4 whether or not it is first of its share.
    assert train.shifted(3).seed == 22 and val.shifted(3) is val


@pytest.mark.parametrize("num, groups", [(10, 3), (3, 2), (2, 4), (0, 2), (8, 1)])
def test_shares_are_contiguous_balanced_and_cover_everything(num, groups):
    shares = [share(num, k, groups) for k in range(groups)]
    assert [i for s in shares for i in range(num)[s]] == list(range(num))
    sizes = [s.stop - s.start for s in shares]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_rollout_groups_are_consecutive_ranks():
    assert RolloutGroups.from_world(5, 8, 2) == RolloutGroups(tp_size=2, tp_rank=1, dp_size=4, dp_rank=2)
    assert RolloutGroups.from_world(0, 1, 1) == RolloutGroups(1, 0, 1, 0)
    with pytest.raises(ValueError, match="must divide the world size 6"):
        RolloutGroups.from_world(0, 6, 4)


def test_collapse_image_pads_keeps_one_pad_per_image():
    V0, P, V1 = 7, 9, 8
    expanded = [1, V0, P, P, P, V1, 2, V0, P, P, V1, 3]
    assert collapse_image_pads(expanded, P) == [1, V0, P, V1, 2, V0, P, V1, 3]
    assert collapse_image_pads([1, V0, P, V1], P) == [1, V0, P, V1]
