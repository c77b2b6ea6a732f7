"""The RL stage's batch source: each step, the next train prompts rolled out by the live policy, scored and turned
into a GRPO batch (a `sid.trainer.BatchIterator` with `attach`).

Per step: the next `prompts_per_step` prompts of a seeded per-epoch order -> G completions each by the current
policy, in length-sorted chunks each padded to its own bucket (constrained beam search, or constrained sampling with
a key from (seed, step, chunk), optionally with upstream's dynamic sampling; optionally the target put last,
add_gt) -> rewards and group advantages
(`sid.rl.rollout.score_groups`) -> each prompt with its G completions, packed into rows (`group_rows`) -> the
reference model's (`sid.rl.reference`) log-probs of the completions, once per rollout -> host numpy arrays. The
state is the number of prompts consumed, so a resumed run draws the same prompts and keys.

The rollout's figures travel as per-completion `rollout/<name>` columns (a group's value on each of its G, laid out
like the rows' completions), which `sid.rl.loss.make_loss_fn` sums into the step's stats: they reach metrics.jsonl
and W&B through the trainer's own logging, on the step they belong to, with no second writer of metrics.jsonl to
keep consistent on resume.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from sid.eval.beam import sharded_beam_search
from sid.eval.runner import smallest_bucket
from sid.eval.sampling import sharded_constrained_sample
from sid.eval.trie import SidTrie
from sid.parallel.host import global_array, to_host
from sid.parallel.mesh import batch_sharding, data_parallel_size
from sid.parallel.trace import traced_on
from sid.rl.config import RLConfig
from sid.rl.loss import ROW_KEYS, completion_logprobs
from sid.rl.reference import Reference
from sid.rl.rewards import get_reward
from sid.rl.rollout import dynamic_selection, group_rows, score_groups, target_leaves, with_target_last

log = logging.getLogger("sid")


def left_pad(prompts: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) [prompts, length]: each prompt's last `length` tokens, left-padded with `pad_id`."""
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for r, p in enumerate(prompts):
        p = p[-length:]
        ids[r, length - len(p) :] = p
        mask[r, length - len(p) :] = True
    return ids, mask


class RolloutSource:
    """GRPO batches from the live policy's own rollouts over the train prompts (see the module docstring)."""

    def __init__(self, trie: SidTrie, prompts: list[list[int]], targets: list[str], start, cfg: RLConfig, mesh,
                 *, prompt_length: int, pad_id: int, seed: int, run_dir: Path, micro_batches: int = 1,
                 buckets: tuple[int, ...] = ()):  # fmt: skip
        self.trie, self.targets, self.cfg, self.mesh, self.seed = trie, np.asarray(targets), cfg, mesh, seed
        # A rollout chunk is padded to the smallest of these that holds its prompts (never past prompt_length).
        self.buckets = sorted({b for b in buckets if b < prompt_length} | {prompt_length})
        self.micro_batches = micro_batches  # the reference pass's, as the update's (train.grad_accum_steps)
        self.sharding = batch_sharding(mesh)
        self.cells = data_parallel_size(mesh) * micro_batches  # a cell of rows for each shard's micro-batch
        self.target_leaves = target_leaves(trie, targets)
        self.ids, self.mask = left_pad(prompts, prompt_length, pad_id)
        self.lengths = self.mask.sum(axis=1)  # each prompt's tokens, as left-padded
        self.reward = get_reward(cfg.reward)
        self.reference = Reference(start, cfg, mesh, run_dir)
        self.consumed = 0
        self.policy: Callable[[], Any] | None = None
        self.ref_logprobs = eqx.filter_jit(traced_on(mesh, completion_logprobs))
        if cfg.rollout == "beam":
            self.rollout = sharded_beam_search(mesh, start, num_beams=cfg.group_size)
        else:
            draws = int(1.5 * cfg.group_size) if cfg.dynamic_sampling else cfg.group_size
            self.rollout = sharded_constrained_sample(mesh, start, num_samples=draws, temperature=cfg.temperature)

    def attach(self, current_model: Callable[[], Any]) -> None:
        """The trainer's live model (called before every rollout)."""
        self.policy = current_model

    def get_state(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def set_state(self, state: dict[str, Any]) -> None:
        self.consumed = int(state["consumed"])
        self.reference.resumed()

    def close(self) -> None:
        self.reference.close()

    @property
    def step(self) -> int:
        """Optimizer steps already taken (the batch about to be drawn is for step + 1)."""
        return self.consumed // self.cfg.prompts_per_step

    def _next_prompts(self) -> np.ndarray:
        """Indices of the next prompts_per_step prompts: each epoch a fresh permutation seeded by (seed, epoch)."""
        n = len(self.targets)
        positions = np.arange(self.consumed, self.consumed + self.cfg.prompts_per_step)
        self.consumed += self.cfg.prompts_per_step
        orders = {e: np.random.default_rng([self.seed, e]).permutation(n) for e in np.unique(positions // n)}
        return np.array([orders[p // n][p % n] for p in positions])

    def __next__(self) -> dict[str, np.ndarray]:
        if self.policy is None:
            raise RuntimeError("RolloutSource needs attach(current_model) before the first batch")
        policy = self.policy()
        step = self.step
        reference = self.reference.at(step, policy)
        idx = self._next_prompts()
        leaves = self._rollout(policy, idx, step)
        rewards, advantages, _ = score_groups(self.trie, leaves, self.targets[idx], self.reward)
        rows, plan = group_rows(self.trie, self.ids[idx], self.mask[idx], leaves, pack=self.cfg.pack, cells=self.cells)
        batch = {**rows, "advantages": plan.place(advantages), "ref_logp": self._reference_logprobs(reference, rows)}
        columns = rollout_columns(self.trie, leaves, self.targets[idx], rewards)
        return process_rows(batch | {name: plan.place(column) for name, column in columns.items()})

    def _reference_logprobs(self, reference, rows: dict[str, np.ndarray]) -> np.ndarray:
        """The reference model's log-probs of the rows' completions [cells, groups, G, T], a micro-batch's cells at a
        time: the pass never holds more logits ([cells, groups, G, T, vocab]) than one update micro-batch does."""
        split = {k: np.split(rows[k], self.micro_batches) for k in ROW_KEYS}
        out = [
            self.ref_logprobs(reference, {k: global_array(parts[i], self.sharding) for k, parts in split.items()})
            for i in range(self.micro_batches)
        ]
        return np.concatenate([np.asarray(to_host(logp)) for logp in out])

    def _rollout(self, policy, idx: np.ndarray, step: int) -> np.ndarray:
        """The policy's completions (trie leaves [prompts, G]) for the prompts `idx`: beams, or samples (keys from
        (seed, step, chunk)), in `rl.rollout_chunks` chunks of prompts sorted by length, each padded to its own
        bucket; then dynamic sampling's selection and add_gt's target, when enabled."""
        by_length = np.argsort(self.lengths[idx], kind="stable")
        chunks = np.split(by_length, self.cfg.rollout_chunks)
        outs = [self._rollout_chunk(policy, idx[part], step, c) for c, part in enumerate(chunks)]  # all dispatched
        leaves = np.zeros((len(idx), outs[0].leaves.shape[1]), np.int64)
        for part, out in zip(chunks, outs, strict=True):
            leaves[part] = np.asarray(to_host(out.leaves))
        if self.cfg.dynamic_sampling:
            leaves = dynamic_selection(leaves, self.target_leaves[idx], self.cfg.group_size)
        if self.cfg.add_gt:
            leaves = with_target_last(leaves, self.target_leaves[idx])
        return leaves

    def _rollout_chunk(self, policy, idx: np.ndarray, step: int, chunk: int):
        """The rollout program's output for the prompts `idx`, left-padded to the smallest bucket that holds them
        (their last columns of the prompts' padding to prompt_length); dispatched, not read."""
        width = smallest_bucket(int(self.lengths[idx].max()), self.buckets)
        ids, mask = (global_array(a[idx][:, -width:], self.sharding) for a in (self.ids, self.mask))
        if self.cfg.rollout == "beam":
            return self.rollout(policy, self.trie.tables, ids, mask)
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), step), chunk)
        return self.rollout(policy, self.trie.tables, ids, mask, key)


def rollout_columns(trie: SidTrie, leaves: np.ndarray, targets: np.ndarray, rewards: np.ndarray) -> dict:
    """Per-completion float32 `rollout/<name>` columns [P, G]: the completion's reward, and its group's reward
    std, whether all its group's rewards are equal (zero advantage) and whether its group holds the target. Summed
    and divided by the completions they give `score_groups`' metrics of the same names."""
    hit = (np.asarray(trie.sids)[leaves] == targets[:, None]).any(axis=1)
    per_group = {
        "rollout/reward_std": rewards.std(axis=1, ddof=1),
        "rollout/zero_advantage_fraction": np.ptp(rewards, axis=1) == 0,
        "rollout/group_hit_rate": hit,
    }
    columns = {k: np.repeat(v.astype(np.float32)[:, None], rewards.shape[1], axis=1) for k, v in per_group.items()}
    return {"rollout/reward_mean": rewards.astype(np.float32), **columns}


def process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous share of the rows (every process computed the whole rollout)."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return batch
    return {k: np.split(v, count)[index] for k, v in batch.items()}
