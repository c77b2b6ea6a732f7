"""From rollouts to a GRPO batch, host-side: each group's rewards and advantages, and the grouped rows the loss
reads (`sid.rl.loss.make_loss_fn`).

A rollout is the trie leaves [prompts, G] that `sid.eval.beam.beam_search` (group = beams, best first) or
`sid.eval.sampling.constrained_sample` (draw order) returns for a batch of left-padded prompts. The batch puts
each prompt's G completions beside it, so the loss runs each prompt once, and packs several such groups into a row
where they fit (`group_rows`), so it runs little padding. Ranks are the position in the group, as upstream's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from sid.eval.trie import SidTrie
from sid.models.qwen2 import prefix_segments
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


def row_width(prompt_length: int, group: int, completion_tokens: int) -> int:
    """Columns of a `group_rows` row: the longest prompt and its group's completions, each without its last token
    (nothing is predicted from it)."""
    return prompt_length + group * (completion_tokens - 1)


@dataclass(frozen=True)
class RowPlan:
    """Where each group of a rollout lies in the batch. The batch is `cells` cells, each one data shard's share of
    one micro-batch, so a cell never spans devices; a cell has `groups` group slots and `rows` rows. Group p is slot
    `slot[p]` of cell `cell[p]`, and lies in the cell's row `row[p]` from column `start[p]`."""

    cell: np.ndarray
    slot: np.ndarray
    row: np.ndarray
    start: np.ndarray
    cells: int
    groups: int
    rows: int

    def place(self, x: np.ndarray) -> np.ndarray:
        """Per-group values [P, ...] laid out as the batch's [cells, groups, ...], zeros in the empty slots."""
        out = np.zeros((self.cells, self.groups, *x.shape[1:]), x.dtype)
        out[self.cell, self.slot] = x
        return out


def plan_rows(lengths: np.ndarray, width: int, *, pack: bool, cells: int) -> RowPlan:
    """Groups of `lengths` tokens into `cells` cells (the mesh's data shards x micro-batches) of rows of `width`.

    Each cell holds an equal share of the groups (one more where they do not split evenly): longest first, each
    group goes to the cell with the fewest tokens so far among those with a free slot, so the cells need about the
    same rows. Within a cell, unpacked: one group per row; packed: first-fit-decreasing, each group into the
    cell's first row with room. Every cell gets the most rows any cell needs (the rest empty). Logits are computed
    per group slot, not per row, so packing adds no logits. A function of the lengths alone (ties go by position)."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and (lengths.min() < 1 or lengths.max() > width):
        raise ValueError(f"groups of {lengths.min()} to {lengths.max()} tokens: each must fill 1 to {width} (a row)")
    if cells < 1:
        raise ValueError(f"cells must be >= 1, got {cells}")
    groups = max(-(-len(lengths) // cells), 1)
    order = np.argsort(-lengths, kind="stable")
    cell, slot = _deal(lengths, order, cells, groups)
    if not pack:
        return RowPlan(cell, slot, slot, np.zeros_like(slot), cells, groups, groups)
    row, start = np.zeros_like(slot), np.zeros_like(slot)
    filled = np.zeros((cells, groups), np.int64)
    for p in order:
        c = cell[p]
        r = int(np.argmax(filled[c] + lengths[p] <= width))  # the cell's first row with room
        row[p], start[p] = r, filled[c, r]
        filled[c, r] += lengths[p]
    return RowPlan(cell, slot, row, start, cells, groups, int(row.max(initial=0)) + 1)


def _deal(lengths: np.ndarray, order: np.ndarray, cells: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """(cell, slot in the cell) of each group: in `order`, to the cell with the fewest tokens among those with
    fewer than `groups` groups (the first such cell on a tie)."""
    cell, slot = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
    tokens, counts = np.zeros(cells, np.int64), np.zeros(cells, np.int64)
    for p in order:
        c = int(np.argmin(np.where(counts < groups, tokens, np.iinfo(np.int64).max)))
        cell[p], slot[p] = c, counts[c]
        tokens[c] += lengths[p]
        counts[c] += 1
    return cell, slot


def group_rows(
    trie: SidTrie, prompt_ids: np.ndarray, prompt_mask: np.ndarray, leaves: np.ndarray, *, pack: bool = True,
    cells: int = 1,
) -> tuple[dict[str, np.ndarray], RowPlan]:  # fmt: skip
    """The batch of a rollout (`sid.rl.loss.completion_logprobs` reads it) and where each group went.

    A group is a prompt (its real tokens: `prompt_mask` True) then each of its G completions without its last
    token; groups are packed into the rows of `cells` cells, each `row_width` columns wide (`plan_rows`). The
    arrays:

    - ``input_ids``, ``positions``, ``segment_ids`` [cells, rows, width]: the k-th group of a row has its prompt
      in shared prefix k and completion g in that prefix's member segment g (`sid.models.qwen2.prefix_segments`),
      so each completion attends to its prompt and its own earlier tokens only; positions count from 0 at the
      prompt and every completion continues from the prompt's length; padding is segment 0;
    - ``completions`` [cells, groups, G, T]: each completion's tokens, its SID and the trie's end tokens;
      ``completion_mask`` (True on the groups' slots); ``token_index``: the column of the cell's rows, flattened
      (row x width + column), whose hidden state predicts the token (the prompt's last for every completion's
      first token).
    """
    leaves = _checked_leaves(trie, leaves)
    prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask, bool)
    if prompt_ids.shape != prompt_mask.shape or prompt_ids.shape[0] != leaves.shape[0]:
        raise ValueError(
            f"prompt_ids {prompt_ids.shape}, prompt_mask {prompt_mask.shape} and leaves {leaves.shape} must "
            "share the number of prompts (and ids and mask their shape)"
        )
    (num_prompts, group), end_ids = leaves.shape, np.asarray(trie.tables.codes)[trie.depth :, 0]
    completions = np.concatenate(
        [trie.paths[leaves], np.broadcast_to(end_ids, (num_prompts, group, end_ids.size))], axis=2
    ).astype(np.int32)
    fed = completions.shape[2] - 1
    width = row_width(prompt_ids.shape[1], group, completions.shape[2])
    lengths = prompt_mask.sum(axis=1)
    if not lengths.all():
        raise ValueError(f"prompt {int(np.argmin(lengths))} has no tokens (prompt_mask all False)")
    plan = plan_rows(lengths + group * fed, width, pack=pack, cells=cells)
    rows = {k: np.zeros((plan.cells, plan.rows, width), np.int32) for k in ("input_ids", "positions", "segment_ids")}
    index = np.zeros((num_prompts, group, fed + 1), np.int32)
    prefixes = np.zeros((plan.cells, plan.rows), np.int64)  # groups already in each row
    for p in range(num_prompts):
        at, n, begin = (plan.cell[p], plan.row[p]), lengths[p], plan.start[p]
        prefix, members = prefix_segments(int(prefixes[at]), group)
        prefixes[at] += 1
        ids = np.concatenate([prompt_ids[p][prompt_mask[p]], completions[p, :, :-1].reshape(-1)])
        span = slice(begin, begin + ids.size)
        rows["input_ids"][at][span] = ids
        rows["positions"][at][span] = np.concatenate([np.arange(n), np.tile(np.arange(n, n + fed), group)])
        rows["segment_ids"][at][span] = np.concatenate([np.full(n, prefix), np.repeat(members, fed)])
        after_prompt = begin + n + fed * np.arange(group)[:, None] + np.arange(fed)[None]  # completions' columns
        index[p] = plan.row[p] * width + np.concatenate([np.full((group, 1), begin + n - 1), after_prompt], axis=1)
    placed = {"completions": completions, "completion_mask": np.ones(completions.shape, bool), "token_index": index}
    return rows | {k: plan.place(v) for k, v in placed.items()}, plan


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
