"""A reward for the rollout-loop tests: 0 or 1 from a hash of the response text (deterministic across
processes, about half of each), so that dynamic sampling keeps some groups and drops others."""

import hashlib
import time


def reward(response, ground_truth, info):
    return float(int(hashlib.md5(response.encode()).hexdigest()[:8], 16) % 2)


def slow_reward(response, ground_truth, info):
    """``reward`` after 50 ms of waiting (the grading wall-time measurement)."""
    time.sleep(0.05)
    return reward(response, ground_truth, info)
