"""Rewards of a rollout group, host-side in NumPy, and a registry of them by name.

A reward function maps a batch of groups to one float per completion (`RewardFn`):

- ``completions`` [prompts, group]: the SID strings of each group (e.g. ``SidTrie.sids[leaves]``), in rank order
  for beam groups (best first) and in draw order for sampled groups;
- ``ranks`` [prompts, group]: each completion's rank in its group, 0-based (upstream uses the position in the
  group, so ``np.arange(group)`` for both kinds of rollout);
- ``targets`` [prompts]: the target SID of each prompt.

Upstream's (MiniOneRec ``rl.py``): ``rule`` is 1 for the target, else 0. ``ranking_only`` is an NDCG-style penalty
applied only to groups that hold the target: the completion at rank i that is not the target gets
``-(1/log2(i+2)) / sum_{j<G} 1/log2(j+2)`` (normalised over all G ranks of the group, so the G penalties sum to -1
whatever the hit's position), the hit gets 0, and groups without a hit get 0 everywhere. ``ranking`` is the sum of
the two (upstream passes both functions to the trainer, which adds them with weight 1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

RewardFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
"""(completions [P, G] SID strings, ranks [P, G] ints, targets [P] SID strings) -> float64 rewards [P, G]."""

REWARDS: dict[str, RewardFn] = {}
"""Reward functions by name (``rl.reward`` in a config); add one with `register_reward`."""


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: make a `RewardFn` available under ``name``."""

    def add(fn: RewardFn) -> RewardFn:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is already registered")
        REWARDS[name] = fn
        return fn

    return add


def get_reward(name: str) -> RewardFn:
    """The registered reward called ``name``; ValueError naming the known ones otherwise."""
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}: expected one of {sorted(REWARDS)}")
    return REWARDS[name]


def _checked(completions, ranks, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    completions, ranks, targets = np.asarray(completions), np.asarray(ranks), np.asarray(targets)
    if completions.ndim != 2:
        raise ValueError(f"completions must be [prompts, group], got shape {completions.shape}")
    if ranks.shape != completions.shape:
        raise ValueError(f"ranks shape {ranks.shape} != completions shape {completions.shape}")
    if targets.shape != completions.shape[:1]:
        raise ValueError(f"targets shape {targets.shape} != ({completions.shape[0]},) (one per prompt)")
    group = completions.shape[1]
    if not np.issubdtype(ranks.dtype, np.integer) or ranks.size and (ranks.min() < 0 or ranks.max() >= group):
        raise ValueError(f"ranks must be integers in [0, {group}) (the group size), got {ranks.dtype} {ranks.tolist()}")
    return completions, ranks, targets


@register_reward("rule")
def rule(completions, ranks, targets) -> np.ndarray:
    """1.0 where the completion is the target SID, else 0.0."""
    completions, _, targets = _checked(completions, ranks, targets)
    return (completions == targets[:, None]).astype(np.float64)


def rank_penalty(ranks: np.ndarray, group: int) -> np.ndarray:
    """``-(1/log2(rank+2))`` normalised by the sum of ``1/log2(j+2)`` over all ``group`` ranks (sums to -1)."""
    discount = 1.0 / np.log2(np.arange(group, dtype=np.float64) + 2.0)
    return -discount[ranks] / discount.sum()


@register_reward("ranking_only")
def ranking_only(completions, ranks, targets) -> np.ndarray:
    """In groups that hold the target: `rank_penalty` for each wrong completion, 0 for the hit; 0 elsewhere."""
    completions, ranks, targets = _checked(completions, ranks, targets)
    hit = completions == targets[:, None]
    penalty = np.where(hit, 0.0, rank_penalty(ranks, completions.shape[1]))
    return np.where(hit.any(axis=1, keepdims=True), penalty, 0.0)


@register_reward("ranking")
def ranking(completions, ranks, targets) -> np.ndarray:
    """`rule` + `ranking_only` (upstream's default ``reward_type``)."""
    return rule(completions, ranks, targets) + ranking_only(completions, ranks, targets)
