"""Reward functions importable by RewardPool worker processes in tests (hostile behaviours on purpose)."""

import os
import time


def sleepy_reward(response: str, answer: str) -> float:
    if response == "hang":
        time.sleep(3600)
    return 1.0


def crashing_reward(response: str, answer: str) -> float:
    if response == "crash":
        os._exit(3)
    if response == "raise":
        raise RuntimeError("bad input")
    return 0.5


def length_parity_reward(response: str, answer: str) -> float:
    """Deterministic in the response, so a test can check each sample got its own score."""
    return float(len(response) % 2)
