"""Reward functions for the distributed-grading tests (imported by the grading workers)."""

import hashlib
import os
import time


def score(response, ground_truth, info):
    """Deterministic, response-dependent, with a format of its own and an extra number."""
    h = int(hashlib.md5(f"{response}/{ground_truth}".encode()).hexdigest()[:8], 16)
    return {"accuracy": float(h % 3 == 0), "format": float(h % 2), "hash_low": float(h % 1000)}


def whose(response, ground_truth, info):
    """Which trainer rank's pool graded this response (the workers inherit torchrun's RANK)."""
    return {"accuracy": 1.0, "rank": float(os.environ.get("RANK", "-1"))}


def slow(response, ground_truth, info):
    """A slow reward: 50 ms per response."""
    time.sleep(0.05)
    return float(response.endswith(ground_truth))
