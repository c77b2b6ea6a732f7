"""From rollouts to a GRPO batch, host-side: each group's rewards and advantages, and the grouped rows the loss
reads (`sid.rl.loss.make_loss_fn`).

A rollout is the trie leaves [prompts, G] that `sid.eval.beam.beam_search` (group = beams, best first) or
`sid.eval.sampling.constrained_sample` (draw order) returns for a batch of left-padded prompts. The batch keeps
one row per prompt, its G completions beside it (`group_rows`), so the loss runs each prompt once. Ranks are the
position in the group, as upstream's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sid.eval.trie import SidTrie
from sid.models.qwen2 import SHARED_SEGMENT
from sid.rl.advantages import group_advantages, zero_advantage_fraction
from sid.rl.rewards import RewardFn


def _checked_leaves(trie: SidTrie, leaves: np.ndarray) -> np.ndarray:
    leaves = np.asarray(leaves)
    if leaves.ndim != 2:
        raise ValueError(f"leaves must be [prompts, group], got shape {leaves.shape}")
    if leaves.size and (leaves.min() < 0 or leaves.max() >= trie.num_leaves):
        raise ValueError(
            f"rollout leaves must lie in [0, {trie.num_leaves}); -1 marks beams the catalog could not fill "
            f"(group of {leaves.shape[1]} beams, catalog of {trie.num_leaves} SIDs)"
        )
    return leaves


def group_rows(
    trie: SidTrie, prompt_ids: np.ndarray, prompt_mask: np.ndarray, leaves: np.ndarray
) -> dict[str, np.ndarray]:
    """The batch of a rollout, one row per prompt (`sid.rl.loss.completion_logprobs` reads it):

    - ``completions`` [P, G, T]: each completion's tokens, its SID and the trie's end tokens (T in all), and
      ``completion_mask`` [P, G, T] (all True: every trie completion has exactly T tokens);
    - ``input_ids`` and ``segment_ids`` [P, prompt + G * (T - 1)]: the left-padded prompt once (segment 0 on the
      pads, `SHARED_SEGMENT` on its tokens), then each completion's first T - 1 tokens in segment g = 1..G.
    """
    leaves = _checked_leaves(trie, leaves)
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask, bool)
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.shape[0] != leaves.shape[0]:
        raise ValueError(
            f"prompt_ids {prompt_ids.shape}, prompt_mask {prompt_mask.shape} and leaves {leaves.shape} must "
            "share the number of prompts (and ids and mask their shape)"
        )
    (num_prompts, group), end_ids = leaves.shape, np.asarray(trie.tables.codes)[trie.depth :, 0]
    sids = trie.paths[leaves]
    completions = np.concatenate([sids, np.broadcast_to(end_ids, (num_prompts, group, end_ids.size))], axis=2)
    fed = completions[:, :, :-1].reshape(num_prompts, -1)  # a completion's last token predicts nothing
    fed_segments = np.repeat(np.arange(1, group + 1), completions.shape[2] - 1)
    return {
        "input_ids": np.concatenate([prompt_ids, fed], axis=1).astype(np.int32),
        "segment_ids": np.concatenate(
            [np.where(prompt_mask, SHARED_SEGMENT, 0), np.broadcast_to(fed_segments, fed.shape)], axis=1
        ).astype(np.int32),
        "completions": completions.astype(np.int32),
        "completion_mask": np.ones(completions.shape, bool),
    }


def score_groups(
    trie: SidTrie, leaves: np.ndarray, targets: Sequence[str], reward: RewardFn
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(rewards [P, G], float32 advantages [P, G], metrics) of a rollout against each prompt's target SID.

    Metrics: ``reward_mean``; ``reward_std`` (the mean of the groups' sample stds, as upstream logs it);
    ``zero_advantage_fraction`` (groups that teach nothing); ``group_hit_rate`` (groups holding the target).
    """
    leaves = _checked_leaves(trie, leaves)
    completions = np.asarray(trie.sids)[leaves]
    targets = np.asarray(targets)
    ranks = np.broadcast_to(np.arange(leaves.shape[1]), leaves.shape)
    rewards = np.asarray(reward(completions, ranks, targets), np.float64)
    if rewards.shape != leaves.shape:
        raise ValueError(f"reward returned shape {rewards.shape}, expected {leaves.shape} (one per completion)")
    metrics = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std(axis=1, ddof=1).mean()),
        "zero_advantage_fraction": zero_advantage_fraction(rewards),
        "group_hit_rate": float((completions == targets[:, None]).any(axis=1).mean()),
    }
    return rewards, group_advantages(rewards).astype(np.float32), metrics


def target_leaves(trie: SidTrie, targets: Sequence[str]) -> np.ndarray:
    """The trie leaf of each target SID; a target outside the catalog's trie is an error naming it."""
    leaf_of = {sid: leaf for leaf, sid in enumerate(trie.sids)}
    missing = [t for t in targets if t not in leaf_of]
    if missing:
        raise ValueError(f"target SID {missing[0]} is not in the catalog's trie ({len(missing)} such targets)")
    return np.array([leaf_of[t] for t in targets], np.int64)


def with_target_last(leaves: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Upstream's add_gt: the last completion of every group replaced by the target (even when the group already
    holds it, as upstream does)."""
    out = np.array(leaves, copy=True)
    out[:, -1] = targets
    return out


def dynamic_selection(draws: np.ndarray, targets: np.ndarray, group: int) -> np.ndarray:
    """Upstream's dynamic sampling: from each prompt's draws (more than `group`), keep `group` completions: the
    target's copies first (up to `group`), then the other drawn SIDs in order of how often they were drawn (ties
    by first draw), one copy of each per round while copies remain."""
    if draws.shape[1] < group:
        raise ValueError(f"dynamic sampling keeps {group} of each prompt's draws, but got {draws.shape[1]}")
    return np.stack([_select(row, target, group) for row, target in zip(draws, targets, strict=True)])


def _select(draws: np.ndarray, target: int, group: int) -> np.ndarray:
    values, first, counts = np.unique(draws, return_index=True, return_counts=True)
    order = sorted(range(len(values)), key=lambda i: (-counts[i], first[i]))
    remaining = {int(values[i]): int(counts[i]) for i in order}
    picked = [target] * min(remaining.pop(int(target), 0), group)
    while len(picked) < group:
        for leaf in remaining:
            if remaining[leaf] > 0 and len(picked) < group:
                picked.append(leaf)
                remaining[leaf] -= 1
    return np.asarray(picked, draws.dtype)
