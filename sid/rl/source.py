"""The RL stage's batch source: each step, the next train prompts rolled out by the live policy, scored and turned
into a GRPO batch (a `sid.trainer.BatchIterator` with `attach`).

Per step: the next `prompts_per_step` prompts of a seeded per-epoch order -> G completions each by the current
policy (constrained beam search, or constrained sampling with a key from (seed, step)) -> rewards and group
advantages (`sid.rl.rollout.score_groups`) -> `[prompt | completion]` rows (`group_rows`) -> the reference model's
log-probs of the completions, once per rollout -> host numpy arrays. The state is the number of prompts consumed, so
a resumed run draws the same prompts and keys.

The rollout's figures travel as per-row `rollout/<name>` columns (each group's value on each of its G rows), which
`sid.rl.loss.make_loss_fn` sums into the step's stats: they reach metrics.jsonl and W&B through the trainer's own
logging, on the step they belong to, with no second writer of metrics.jsonl to keep consistent on resume.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from sid.eval.beam import sharded_beam_search
from sid.eval.sampling import sharded_constrained_sample
from sid.eval.trie import SidTrie
from sid.parallel.host import global_array, to_host
from sid.parallel.mesh import batch_sharding
from sid.parallel.rules import param_shardings
from sid.parallel.trace import traced_on
from sid.rl.config import RLConfig
from sid.rl.loss import completion_logprobs
from sid.rl.rewards import get_reward
from sid.rl.rollout import group_rows, score_groups

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


def placed_copy(model, mesh):
    """A copy of `model` with its own buffers, sharded like the trainer's params: the train step donates the
    policy's buffers, so a reference model must never share them."""
    params, static = eqx.partition(model, eqx.is_array)
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=param_shardings(params, mesh))
    # Done before returning: on simulated CPU devices, this copy still running beside the next collective program
    # (the trainer's checkpoint check on resume) once left that program's all-reduce waiting forever.
    return eqx.combine(jax.block_until_ready(copy(params)), static)


class RolloutSource:
    """GRPO batches from the live policy's own rollouts over the train prompts (see the module docstring)."""

    def __init__(self, trie: SidTrie, prompts: list[list[int]], targets: list[str], reference, cfg: RLConfig, mesh,
                 *, prompt_length: int, pad_id: int, seed: int):  # fmt: skip
        self.trie, self.targets, self.cfg, self.mesh, self.seed = trie, np.asarray(targets), cfg, mesh, seed
        self.ids, self.mask = left_pad(prompts, prompt_length, pad_id)
        self.reward = get_reward(cfg.reward)
        self.reference = placed_copy(reference, mesh)
        self.synced_at: int | None = 0  # the reference is the starting policy, i.e. the policy at step 0
        self.consumed = 0
        self.policy: Callable[[], Any] | None = None
        num_tokens = trie.tables.num_steps
        self.ref_logprobs = eqx.filter_jit(
            traced_on(mesh, lambda m, ids, seg: completion_logprobs(m, ids, seg, num_tokens))
        )
        if cfg.rollout == "beam":
            self.rollout = sharded_beam_search(mesh, reference, num_beams=cfg.group_size)
        else:
            self.rollout = sharded_constrained_sample(
                mesh, reference, num_samples=cfg.group_size, temperature=cfg.temperature
            )

    def attach(self, current_model: Callable[[], Any]) -> None:
        """The trainer's live model (called before every rollout)."""
        self.policy = current_model

    def get_state(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def set_state(self, state: dict[str, Any]) -> None:
        self.consumed = int(state["consumed"])
        self.synced_at = None if self.cfg.ref_sync_every else 0  # a synced reference is not in the checkpoint

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

    def _sync_reference(self, policy) -> None:
        """Copy the policy into the reference every ref_sync_every steps. After a resume from a step between two
        syncs the policy of the last sync is gone: the reference restarts from the resumed policy (a warning says
        so; choose save_every as a multiple of ref_sync_every for a resume that matches an uninterrupted run)."""
        every = self.cfg.ref_sync_every
        if not every:
            return
        due = self.step // every * every
        if self.synced_at == due:
            return
        if self.step != due:
            log.warning("rl: the reference of step %d is not in the checkpoint; it restarts from step %d's policy",
                        due, self.step)  # fmt: skip
        self.reference = placed_copy(policy, self.mesh)
        self.synced_at = due

    def __next__(self) -> dict[str, np.ndarray]:
        if self.policy is None:
            raise RuntimeError("RolloutSource needs attach(current_model) before the first batch")
        policy = self.policy()
        self._sync_reference(policy)
        step = self.step
        idx = self._next_prompts()
        sharding = batch_sharding(self.mesh)
        ids, mask = global_array(self.ids[idx], sharding), global_array(self.mask[idx], sharding)
        if self.cfg.rollout == "beam":
            out = self.rollout(policy, self.trie.tables, ids, mask)
        else:
            key = jax.random.fold_in(jax.random.key(self.seed), step)
            out = self.rollout(policy, self.trie.tables, ids, mask, key)
        leaves = np.asarray(to_host(out.leaves))
        rewards, advantages, _ = score_groups(self.trie, leaves, self.targets[idx], self.reward)
        rows = group_rows(self.trie, self.ids[idx], self.mask[idx], leaves)
        ref_logp = self.ref_logprobs(
            self.reference, global_array(rows["input_ids"], sharding), global_array(rows["segment_ids"], sharding)
        )
        batch = {**rows, "advantages": advantages.reshape(-1), "ref_logp": np.asarray(to_host(ref_logp))}
        batch.update(rollout_columns(self.trie, leaves, self.targets[idx], rewards))
        return process_rows(batch)


def rollout_columns(trie: SidTrie, leaves: np.ndarray, targets: np.ndarray, rewards: np.ndarray) -> dict:
    """Per-row float32 `rollout/<name>` columns: the completion's reward, and its group's reward std, whether all
    its group's rewards are equal (zero advantage) and whether its group holds the target. Summed over rows and
    divided by the completions they give `score_groups`' metrics of the same names (every group has G rows)."""
    group = rewards.shape[1]
    hit = (np.asarray(trie.sids)[leaves] == targets[:, None]).any(axis=1)
    per_group = {
        "rollout/reward_std": rewards.std(axis=1, ddof=1),
        "rollout/zero_advantage_fraction": np.ptp(rewards, axis=1) == 0,
        "rollout/group_hit_rate": hit,
    }
    columns = {k: np.repeat(v.astype(np.float32), group) for k, v in per_group.items()}
    return {"rollout/reward_mean": rewards.reshape(-1).astype(np.float32), **columns}


def process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's contiguous share of the rows (every process computed the whole rollout)."""
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return batch
    return {k: np.split(v, count)[index] for k, v in batch.items()}
