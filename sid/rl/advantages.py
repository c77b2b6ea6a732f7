"""Group-relative advantages (GRPO): each completion's reward against its own group's mean and spread."""

from __future__ import annotations

import numpy as np

STD_EPS = 1e-4
"""Added to the group std (upstream's constant), so groups of equal rewards get advantage 0, not 0/0."""


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """``(r - group mean) / (group std + 1e-4)`` over the last axis of ``rewards`` [prompts, group], in float64.

    The std is the sample std (ddof=1), as upstream's ``torch.Tensor.std`` default; groups need >= 2 completions.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [prompts, group] with group >= 2, got shape {rewards.shape}")
    if not np.all(np.isfinite(rewards)):
        raise ValueError("rewards must be finite")
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, ddof=1, keepdims=True)
    return (rewards - mean) / (std + STD_EPS)


def zero_advantage_fraction(rewards: np.ndarray) -> float:
    """Fraction of groups whose rewards are all equal: their advantages are all 0 and they teach nothing."""
    rewards = np.asarray(rewards)
    if rewards.ndim != 2 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be [prompts, group] with prompts >= 1, got shape {rewards.shape}")
    return float(np.mean(np.ptp(rewards, axis=1) == 0))
