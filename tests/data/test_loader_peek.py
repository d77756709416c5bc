"""PromptDataLoader.peek_indices: the batches next_indices() will return, without moving the position
(the rollout prepares and speculatively generates batches it may not take)."""

import pytest

from megatron_vgpo.data import PromptDataLoader
from megatron_vgpo.data.loader import val_batch_ranges


class Ten:
    def __len__(self):
        return 10


@pytest.mark.parametrize("shuffle", [True, False])
def test_peek_names_the_coming_batches_across_epochs(shuffle):
    loader = PromptDataLoader(Ten(), 3, shuffle=shuffle, seed=4)
    for _ in range(7):  # 3 batches an epoch: peeks cross epoch boundaries
        state = loader.state_dict()
        ahead = [loader.peek_indices(k) for k in range(4)]
        assert loader.state_dict() == state
        assert ahead[0] == loader.peek_indices()
        reference = PromptDataLoader(Ten(), 3, shuffle=shuffle, seed=4)
        reference.load_state_dict(state)
        assert [reference.next_indices() for _ in range(4)] == ahead
        assert loader.next_indices() == ahead[0]


def test_val_batch_ranges():
    assert val_batch_ranges(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert val_batch_ranges(10, -1) == [range(0, 10)]
    with pytest.raises(ValueError, match="validation batch size"):
        val_batch_ranges(10, 0)
