"""The RL stage's reference model: the KL term's anchor, frozen or synced towards the policy every N steps.

At a sync, reference <- alpha * policy + (1 - alpha) * reference (alpha 1: a copy). The reference of a sync
depends on every sync before it, so each one is saved (RUN_DIR/reference, the newest two kept) and a resumed run
restores the reference its step had: the result is bitwise that of an uninterrupted run.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

from sid.checkpoint import Checkpointer, abstract_like
from sid.parallel.rules import param_shardings
from sid.rl.config import RLConfig

log = logging.getLogger("sid")

REFERENCE_DIR = "reference"
"""Subdirectory of an RL run's output_dir that holds the synced references."""


def placed_copy(model, mesh):
    """A copy of `model` with its own buffers, sharded like the trainer's params: the train step donates the
    policy's buffers, so a reference model must never share them."""
    params, static = eqx.partition(model, eqx.is_array)
    copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=param_shardings(params, mesh))
    # Done before returning: on simulated CPU devices, this copy still running beside the next collective program
    # (the trainer's checkpoint check on resume) once left that program's all-reduce waiting forever.
    return eqx.combine(jax.block_until_ready(copy(params)), static)


def _mix(alpha: float, mesh, reference, policy):
    """alpha * policy + (1 - alpha) * reference, leaf by leaf in float32, in the reference's dtypes and shardings."""
    ref_params, static = eqx.partition(reference, eqx.is_array)

    def leaf(r, p):
        return (alpha * p.astype(jnp.float32) + (1 - alpha) * r.astype(jnp.float32)).astype(r.dtype)

    mix = functools.partial(jax.tree.map, leaf)
    mixed = jax.jit(mix, out_shardings=param_shardings(ref_params, mesh))(ref_params, eqx.filter(policy, eqx.is_array))
    return eqx.combine(jax.block_until_ready(mixed), static)


class Reference:
    """The reference model for each step's batch (`at`), with its syncs saved under `run_dir` for resume."""

    def __init__(self, start, cfg: RLConfig, mesh, run_dir: Path):
        self.model, self.mesh = placed_copy(start, mesh), mesh
        self.every, self.alpha = cfg.ref_sync_every, cfg.ref_sync_alpha
        self.synced_at: int | None = 0  # the starting policy is the reference of step 0
        self.saved = Checkpointer(Path(run_dir) / REFERENCE_DIR, keep=2) if self.every else None

    def resumed(self) -> None:
        """The run resumed: the next `at` restores (or re-makes) the reference of its step."""
        if self.every:
            self.synced_at = None

    def at(self, step: int, policy):
        """The reference for the batch drawn after `step` optimizer steps, with `policy` the model after them."""
        if not self.every:
            return self.model
        due = step // self.every * self.every
        if self.synced_at is None:
            self._restore(due, step, policy)
        if self.synced_at != due:
            self._sync(due, policy)
        return self.model

    def _sync(self, due: int, policy) -> None:
        if self.alpha == 1:
            self.model = placed_copy(policy, self.mesh)
        else:
            self.model = _mix(self.alpha, self.mesh, self.model, policy)
        self.synced_at = due
        self.saved.save(due, eqx.filter(self.model, eqx.is_array), {"step": due}, wait=True)

    def _restore(self, due: int, step: int, policy) -> None:
        """After a resume: the saved reference of `due`; else, resumed exactly at a sync, the one before it to
        sync from (the starting model for the first sync); else (the saved syncs are gone) the policy, with a
        warning that the run now differs from an uninterrupted one."""
        have = set(self.saved.manager.all_steps())
        before = due - self.every
        if due == 0 or due in have:
            self._load(due)
        elif step == due and self.alpha == 1:
            self.synced_at = before  # `at` now copies the policy, whatever the reference held
        elif step == due and (before == 0 or before in have):
            self._load(before)
        else:
            log.warning("rl: the reference of step %d is not in %s; it restarts from step %d's policy", due,
                        self.saved.directory, step)  # fmt: skip
            self.model, self.synced_at = placed_copy(policy, self.mesh), due

    def _load(self, step: int) -> None:
        if step:  # the reference of step 0 is the starting model, which the constructor copied
            params, static = eqx.partition(self.model, eqx.is_array)
            _, params, _ = self.saved.restore(abstract_like(params), step)
            self.model = eqx.combine(params, static)
        self.synced_at = step

    def close(self) -> None:
        if self.saved is not None:
            self.saved.close()
