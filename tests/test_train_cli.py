"""``megatron_vgpo.train``'s final accuracy table: one row per validation dataset, nothing pooled."""

from __future__ import annotations

from megatron_vgpo.train import accuracy_table


def test_rows_are_the_datasets_only():
    # What Rollouts.validate logs for the quickstart's two validation files (and the trainer keeps).
    summary = {"val/accuracy": 0.605, "val/accuracy/val": 0.96, "val/accuracy/val_blank": 0.25}
    assert accuracy_table(summary).splitlines() == [
        "dataset    accuracy",
        "---------  --------",
        "val           0.960",
        "val_blank     0.250",
    ]


def test_one_dataset_and_short_names():
    assert accuracy_table({"val/accuracy": 0.5, "val/accuracy/geo": 0.5}).splitlines() == [
        "dataset  accuracy",
        "-------  --------",
        "geo         0.500",
    ]


def test_no_validation():
    assert "no validation" in accuracy_table({})
    assert "no validation" in accuracy_table({"val/accuracy": 0.3})
