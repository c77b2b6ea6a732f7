"""Orbax checkpoints of the whole training state: params + optimizer state + step + RNG key (arrays, restored
with their shardings) and the data-iterator state (JSON), saved asynchronously, keeping the newest K.

A damaged checkpoint (a truncated file, a zeroed array blob, a missing item) is found by restoring it, and resume
falls back to the newest intact one. A checkpoint directory that cannot be written fails the save at once."""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from sid.errors import UserError

log = logging.getLogger("sid")

DAMAGED_SUFFIX = ".damaged"
"""Damaged steps newer than the one resumed from move to `<checkpoint dir>.damaged/<step>` (kept to inspect)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written, or no checkpoint could be restored; the message names the directory."""

    exit_code = 1


class Checkpointer:
    """Saves and restores `(state pytree of arrays, data-iterator state dict)` under `directory`, keeping the
    newest `keep`; `read_only` (evaluation) only restores and writes nothing."""

    def __init__(self, directory: str | Path, *, keep: int | None, read_only: bool = False):
        self.directory = Path(directory).absolute()
        if not read_only:
            self._probe(None)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, read_only=read_only, create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def _probe(self, step: int | None) -> None:
        """Fail now, with one line, where orbax's background save would fail later (and leave its other threads
        waiting forever for the failed one): create and remove a directory where the step directories go."""
        probe = self.directory / f".write-probe-{uuid.uuid4().hex[:8]}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            probe.mkdir()
            probe.rmdir()
        except OSError as e:
            at = "" if step is None else f" step {step}"
            raise CheckpointError(f"{self.directory}: cannot write checkpoint{at}: {e.strerror or e}") from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any], *, wait: bool = False) -> None:
        """Start saving `step` (in the background unless `wait`); a previous save finishes first."""
        self._probe(step)
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
                force=True,
            )
            if wait:
                self.manager.wait_until_finished()
        except Exception as e:
            _release_waiting_save_threads()
            raise CheckpointError(f"{self.directory}: saving checkpoint step {step} failed: {error_line(e)}") from e

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[int, Any, dict[str, Any]]:
        """Restore into `abstract_state` (a pytree of jax.ShapeDtypeStruct carrying shardings)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return step, out["state"], out["data"]

    def restore_latest_intact(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """Restore the newest checkpoint that restores whole and finite; None when there is none at all.

        Each damaged step gets one warning naming it and what is wrong; the damaged steps newer than the one
        restored move aside (DAMAGED_SUFFIX), so the resumed run can save those steps again. Raises CheckpointError
        naming each step's problem when no step is intact."""
        found = self._newest_intact(lambda step: self.restore(abstract_state, step), "resume from")
        if found is None:
            return None
        restored, damaged = found
        self._move_aside(damaged)
        return restored

    def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[int, Any]:
        """(step, params) of `step`, or of the newest intact step: only the `params` item of the saved state (what
        evaluation needs: no optimizer state to rebuild). Damaged steps are warned about and left in place."""

        def params_of(s: int) -> tuple[int, Any]:
            target = {"params": abstract_params}
            restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
            args = ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
            return s, self.manager.restore(s, args=ocp.args.Composite(state=args))["state"]["params"]

        found = self._newest_intact(params_of, "evaluate", steps=None if step is None else [step])
        if found is None:
            raise CheckpointError(f"{self.directory}: no checkpoint to evaluate")
        return found[0]

    def _newest_intact(self, restore, purpose: str, steps: list[int] | None = None):
        """(restore(step) of the newest step that restores and is finite, the damaged steps newer than it), None
        without steps; CheckpointError naming each step's problem when none is intact."""
        problems: list[tuple[int, str]] = []
        for step in sorted(self.manager.all_steps() if steps is None else steps, reverse=True):
            try:
                restored = restore(step)
                if not all_finite(restored[1]):
                    raise ValueError("it holds NaN or Inf values")
            except Exception as e:  # noqa: BLE001 - any failure to read a step means that step is damaged
                why = error_line(e)
                problems.append((step, why))
                log.warning("checkpoint %s is damaged (%s); trying an older one", self.directory / str(step), why)
                continue
            return restored, [s for s, _ in problems]
        if problems:
            listed = "; ".join(f"step {s}: {why}" for s, why in problems)
            raise CheckpointError(f"{self.directory}: no intact checkpoint to {purpose} ({listed})")
        return None

    def _move_aside(self, steps: list[int]) -> None:
        """Move damaged `steps` out of the way (process 0 moves, every process then sees it)."""
        if not steps:
            return
        aside = self.directory.with_name(self.directory.name + DAMAGED_SUFFIX)
        if jax.process_index() == 0:
            aside.mkdir(exist_ok=True)
            for step in steps:
                target = aside / str(step)
                shutil.rmtree(target, ignore_errors=True)
                shutil.move(self.directory / str(step), target)
            log.warning("moved damaged checkpoint step(s) %s to %s", ", ".join(map(str, steps)), aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("sid: damaged checkpoints moved aside")
        self.manager.reload()

    def close(self) -> None:
        """Wait for the last save, then release the manager; a failed save raises CheckpointError."""
        try:
            self.manager.wait_until_finished()
            self.manager.close()
        except Exception as e:
            _release_waiting_save_threads()
            raise CheckpointError(f"{self.directory}: the last checkpoint save failed: {error_line(e)}") from e


def _release_waiting_save_threads() -> None:
    """After a failed async save, wake orbax's helper threads that wait for a signal the failed one never sends.

    They are not daemon threads, so otherwise the interpreter waits for them at exit (each waits orbax's barrier
    timeout, minutes, and they wait in turn): a failed save would hang the process after its error. Each is
    cancelled, then its awaited signals are set so it wakes, sees the cancel and returns. Private orbax API
    (pinned in pyproject): if it changes, this does nothing."""
    try:
        from orbax.checkpoint._src.futures import future
    except ImportError:
        return
    for thread in threading.enumerate():
        if isinstance(thread, getattr(future, "_SignalingThread", ())) and thread.is_alive():
            try:
                thread._cancelled = True
                future.set_signals(thread._receive_signals, operation_id=thread._operation_id)
            except Exception as e:  # noqa: BLE001 - best effort on the way to an error exit
                log.warning("could not release orbax save thread %s (%s)", thread.name, error_line(e))


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of `tree` is finite: one compiled reduction and one transfer. (Eager ops,
    one per leaf, on arrays spread over several processes hung a two-process resume.)"""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(jax.device_get(_all_finite(leaves))) if leaves else True


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def error_line(e: BaseException, limit: int = 300) -> str:
    """`Type: first line` of an error, without TensorStore's JSON spec and at most `limit` characters."""
    text = (str(e).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0]
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(e).__name__}: {text}".rstrip(": ")


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of jax arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
