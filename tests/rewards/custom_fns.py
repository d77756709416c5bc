"""User reward functions for the tests (loaded as ``tests.rewards.custom_fns:<name>`` by the workers)."""

import os
import sys
import time

NOT_A_FUNCTION = 3


def reward(response, ground_truth, info):
    """Misbehaves on purpose depending on the ground truth."""
    if ground_truth == "hang":
        time.sleep(10_000)
    if ground_truth == "raise":
        raise ValueError(f"cannot grade row {info.get('row_id')}")
    if ground_truth == "exit":
        sys.exit(3)
    if ground_truth == "crash":
        os._exit(1)
    if ground_truth == "nan":
        return float("nan")
    if ground_truth == "text":
        return "yes"
    if ground_truth == "dict":
        return {"accuracy": 0.5, "format": 1.0, "length": len(response)}
    if ground_truth == "nodict":
        return {"score": 1.0}
    print("a user function may print; the worker protocol does not care")
    return 1.0 if response.strip() == ground_truth else 0.0


def echo_info(response, ground_truth, info):
    return {"accuracy": 1.0, "row_len": float(len(info.get("row_id", "")))}
