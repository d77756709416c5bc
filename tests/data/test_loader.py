"""PromptDataLoader: deterministic per-epoch shuffling from the seed, and exact resume from its state."""

import pytest

from megatron_vgpo.data import DatasetError, PromptDataLoader, PromptDataset, build_train_loader
from tests.data.conftest import data_cfg, png, write_rows

N = 10


@pytest.fixture(scope="module")
def dataset(processor, tmp_path_factory):
    rows = [{"problem": f"<image>question {i}", "answer": str(i), "images": [png()]} for i in range(N)]
    f = write_rows(tmp_path_factory.mktemp("loader") / "train.parquet", rows)
    return PromptDataset([f], data_cfg(), processor, 512)


def draw(loader, n):
    return [loader.next_indices() for _ in range(n)]


def test_epochs_are_seeded_permutations(dataset):
    a = draw(PromptDataLoader(dataset, 3, shuffle=True, seed=7), 9)  # 3 batches per epoch, 1 left out
    assert a == draw(PromptDataLoader(dataset, 3, shuffle=True, seed=7), 9)
    assert a != draw(PromptDataLoader(dataset, 3, shuffle=True, seed=8), 9)
    for epoch in range(3):
        served = sum(a[3 * epoch:3 * epoch + 3], [])
        assert len(served) == len(set(served)) == 9  # no repeats within an epoch, no straddling
    assert a[:3] != a[3:6]  # a new order every epoch


def test_no_shuffle_is_file_order(dataset):
    batches = draw(PromptDataLoader(dataset, 5, shuffle=False, seed=0), 3)
    assert batches == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [0, 1, 2, 3, 4]]


@pytest.mark.parametrize("stop", [0, 2, 3, 5])
def test_resume_from_state_continues_exactly(dataset, stop):
    reference = draw(PromptDataLoader(dataset, 3, shuffle=True, seed=1), 8)
    first = PromptDataLoader(dataset, 3, shuffle=True, seed=1)
    draw(first, stop)
    state = first.state_dict()
    resumed = PromptDataLoader(dataset, 3, shuffle=True, seed=1)
    resumed.load_state_dict(dict(state))
    assert draw(resumed, 8 - stop) == reference[stop:]
    assert set(state) >= {"epoch", "index"}


def test_state_from_another_dataset_or_seed_is_refused(dataset):
    loader = PromptDataLoader(dataset, 3, shuffle=True, seed=1)
    with pytest.raises(DatasetError, match="resumed order would differ"):
        loader.load_state_dict({"epoch": 0, "index": 3, "seed": 2, "num_examples": N})
    with pytest.raises(DatasetError, match="resumed order would differ"):
        loader.load_state_dict({"epoch": 0, "index": 3, "seed": 1, "num_examples": N + 1})


def test_batches_hold_examples_and_size_is_checked(dataset, processor):
    batch = PromptDataLoader(dataset, 4, shuffle=True, seed=0).next_batch()
    assert len(batch) == 4 and len({ex.row_id for ex in batch}) == 4
    with pytest.raises(DatasetError, match="rollout batch size 11"):
        PromptDataLoader(dataset, N + 1, shuffle=True, seed=0)
    cfg = data_cfg(train_files=dataset.files, rollout_batch_size=2, seed=3)
    loader = build_train_loader(cfg, processor, 512)
    assert loader.next_indices() == PromptDataLoader(dataset, 2, shuffle=True, seed=3).next_indices()
