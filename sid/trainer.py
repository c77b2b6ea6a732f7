"""The training loop that SFT and nanoGPT share: it drives the pure step (sid.step) over a batch iterator, hands
each step's metrics to the meter (sid.meter), runs the held-out evaluators and the best-checkpoint selection
(sid.selection), saves orbax checkpoints with exact resume, and stops cleanly on SIGTERM, NaN or early stopping."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import equinox as eqx
import jax
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jaxtyping import Array

from sid.checkpoint import Checkpointer, abstract_like
from sid.config import ConfigError, TrainConfig
from sid.meter import Meter, log_step_memory, task_losses
from sid.models.flops import TrainFlops
from sid.optim.config import OptimizerConfig
from sid.optim.routing import routing_table
from sid.optim.schedule import make_schedule
from sid.parallel.host import to_global
from sid.parallel.report import device_bytes, format_bytes, sharding_table
from sid.parallel.rules import without_axis
from sid.run import RunDir, require_shared_directory
from sid.selection import SELECT_KEYS, Evaluator, Selection, due
from sid.step import LossFn, init_state, make_train_step, step_memory_bytes
from sid.tracking import Tracker

log = logging.getLogger("sid")


class BatchIterator(Protocol):
    """What the trainer consumes: host-local numpy batches and a JSON-able state for exact resume.

    A source whose batches depend on the model being trained (RL rollouts: sid.rl.source) also has
    `attach(current_model: Callable[[], model])`: `fit` calls it once, after any resume and before the first
    `__next__`, with a function that returns the live (sharded) model of the step about to run."""

    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


def gather_once_note(params, param_sharding, mesh: Mesh) -> str:
    """What `train.gather_params_once` does on this mesh, and what it costs each device, for the log."""
    if mesh.shape["fsdp"] == 1:
        return "train.gather_params_once: no fsdp axis on this mesh, so the step is the same as without it"
    whole = jax.tree.map(lambda s: NamedSharding(mesh, without_axis(s.spec, "fsdp")), param_sharding)
    n = device_bytes(params, whole)
    return (
        f"train.gather_params_once: each device gathers the f32 params once per step ({format_bytes(n)}) and "
        f"accumulates its rows' whole f32 gradients; about {format_bytes(3 * n)} more per device than FSDP's "
        "shards (params, accumulator, one micro-batch's gradients)"
    )


CHECKPOINT_DIR = "checkpoints"
"""Subdirectory of a run's output_dir that holds its orbax checkpoints."""


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse, before anything is written, to start a fresh run (no `resume`) in a directory that holds an earlier
    run's checkpoints: it would overwrite that run's files and fail when saving over its checkpoint steps."""
    ckpts = Path(cfg.output_dir) / CHECKPOINT_DIR
    if not cfg.resume and ckpts.is_dir() and any(ckpts.iterdir()):
        raise ConfigError(
            f"{ckpts} holds an earlier run's checkpoints: pass --train.resume to continue it, or choose another "
            "--train.output-dir"
        )


def make_optimizer(
    opt_cfg: OptimizerConfig, cfg: TrainConfig, total_steps: int, model
) -> tuple[optax.GradientTransformation, Callable[[Array], Array]]:
    """The optimizer with its warmup/decay schedules (main and aux LR) and the main schedule for logging;
    prints which parameters go to which update rule."""
    if cfg.warmup_steps > total_steps:
        raise ConfigError(f"train.warmup_steps={cfg.warmup_steps} is more than the run's {total_steps} steps")
    kw = dict(warmup_steps=cfg.warmup_steps, total_steps=total_steps, kind=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio)
    lr = make_schedule(cfg.learning_rate, **kw)
    optimizer = opt_cfg.build(
        learning_rate=lr, aux_learning_rate=make_schedule(cfg.aux_learning_rate, **kw), clip_norm=cfg.clip_norm
    )
    table = routing_table(eqx.filter(model, eqx.is_array), optimizer=opt_cfg.name)
    log.info("optimizer %s routing:\n%s", opt_cfg.name, table)
    if opt_cfg.name == "muon_local":
        log.info("Newton–Schulz: %s form in %s", opt_cfg.resolved_ns_method, opt_cfg.resolved_ns_dtype)
    return optimizer, lr


class _Preemption:
    """Turns SIGTERM (spot preemption) into a stop that the loop checks after each step.

    One process: a Python SIGTERM handler sets a flag. Several processes: a pod's hosts get the signal at different
    steps, and a process that stopped alone to save would wait forever for the others inside the collective save.
    There JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM, tells every process,
    and `reached_preemption_sync_point` turns true on all of them at the same step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._collective = jax.process_count() > 1

    def __enter__(self):
        if self._collective:
            return self

        def handler(signum, frame):
            log.warning("SIGTERM received: saving a checkpoint and exiting")
            self.requested = True

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def stop_after(self, step: int) -> bool:
        """Whether to save and stop now that `step` is done (every process must call this after every step)."""
        if self._collective and multihost_utils.reached_preemption_sync_point(step):
            log.warning("preemption notice reached every process: saving a checkpoint at step %d and exiting", step)
            self.requested = True
        return self.requested

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


BEST_DIR = "best"
"""Subdirectory of a run's output_dir that holds the params of the best evaluation (`train.select_by`)."""


class _Session:
    """What the loop carries between steps: the sharded state, its compiled steps (one per batch shape), the rolling
    checkpoints, the best model's checkpoint and the selection."""

    def __init__(self, model, loss_fn: LossFn, optimizer, lr_schedule, batches, cfg: TrainConfig, mesh, run: RunDir):
        self.cfg, self.mesh, self.batches = cfg, mesh, batches
        self.state, self.static, sharding = init_state(model, optimizer, seed=cfg.seed, mesh=mesh)
        log.info(
            "params over mesh %s:\n%s",
            dict(mesh.shape),
            sharding_table(self.state.params, sharding.params, self.state.opt_state, sharding.opt_state),
        )
        if cfg.gather_params_once:
            log.info("%s", gather_once_note(self.state.params, sharding.params, mesh))
        require_shared_directory(run.path)
        self.ckpt = Checkpointer(run.path / CHECKPOINT_DIR, keep=cfg.keep_checkpoints)
        self.best = Checkpointer(run.path / BEST_DIR, keep=1) if cfg.select_by != "none" else None
        self.selection = Selection(SELECT_KEYS.get(cfg.select_by, ""), cfg.early_stop_patience)
        self.start = self.last_saved = 0
        self._resume(run)
        self.step_fn = make_train_step(
            self.static, loss_fn, optimizer, accum=cfg.grad_accum_steps, mesh=mesh, state_sharding=sharding,
            lr_schedule=lr_schedule, gather_once=cfg.gather_params_once,
        )  # fmt: skip
        self.compiled: dict[tuple, Any] = {}
        self.compile_s, self.step_memory = 0.0, 0

    def _resume(self, run: RunDir) -> None:
        """Continue from the newest intact checkpoint (damaged newer ones are warned about and moved aside)."""
        restored = self.ckpt.restore_latest_intact(abstract_like(self.state)) if self.cfg.resume else None
        if restored is not None:
            self.start, self.state, saved = restored
        # The steps after it that an interrupted run logged are logged again (from scratch: step 0's evaluation too).
        run.truncate_metrics(self.start if restored is not None else -1)
        if restored is None:
            if self.cfg.resume:
                log.info("resume requested but %s holds no checkpoint: starting fresh", self.ckpt.directory)
            return
        self.last_saved = self.start
        # Checkpoints before best-checkpoint selection saved the iterator's state alone.
        self.batches.set_state(saved.get("iterator", saved))
        if saved.get("selection"):
            self.selection = Selection.from_state(saved["selection"])
        log.info("resumed from checkpoint step %d", self.start)

    def step(self, host_batch: dict[str, np.ndarray]):
        """Run one optimizer step (compiling it first for a new batch shape); returns its device metrics."""
        batch = to_global(host_batch, self.mesh)
        signature = tuple((k, v.shape) for k, v in sorted(batch.items()))
        if signature not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[signature] = self.step_fn.lower(self.state, batch).compile()
            seconds = time.perf_counter() - t0
            self.compile_s += seconds
            need = step_memory_bytes(self.compiled[signature])
            log_step_memory(need, signature, seconds)
            self.step_memory = max(self.step_memory, need or 0)
        self.state, metrics = self.compiled[signature](self.state, batch)
        return metrics

    @property
    def model(self):
        return eqx.combine(self.state.params, self.static)

    def save(self, step: int, *, wait: bool = False) -> None:
        data = {"iterator": self.batches.get_state(), "selection": self.selection.state()}
        self.ckpt.save(step, self.state, data, wait=wait)
        self.last_saved = step

    def describe_last_saved(self) -> str:
        return f"{self.last_saved if self.last_saved else 'none'} in {self.ckpt.directory}"

    def evaluate(self, step: int, evaluators: Sequence[Evaluator], run: RunDir, tracker: Tracker) -> None:
        """Run the due evaluators on the current model, log their results, keep the model if it is the best."""
        results: dict[str, float] = {}
        for evaluator in evaluators:
            results.update(evaluator(self.model, step))
        log.info("step %d held-out: %s", step, " ".join(f"{k} {v:.4f}" for k, v in results.items()))
        run.append_metrics({"step": step, **results})
        tracker.log({_tracker_key(k): v for k, v in results.items()}, step)
        # A resumed run replays the steps after its checkpoint: a best step saved then is already on disk.
        if self.best is not None and self.selection.update(step, results) and step not in self.best.manager.all_steps():
            self.best.save(step, self.state.params, self.selection.summary())

    def save_final(self, total_steps: int, summary: dict[str, Any]) -> None:
        """The checkpoint of the step the loop ended on (train.save_last), unless preemption already saved it."""
        final_step = int(jax.device_get(self.state.step))
        summary.update(final_step=final_step)
        if "preempted_at" in summary:
            log.warning("preempted: checkpoint %d saved", final_step)
            return
        if "early_stopped_at" in summary:
            s = self.selection
            log.warning(
                "early stop at step %d: %d evaluations without a better %s than step %d's %.4f",
                *(final_step, s.stale, s.metric, s.best_step, s.best_value),
            )
        ended = final_step == total_steps or "early_stopped_at" in summary
        if self.cfg.save_last and ended and self.last_saved != final_step:
            self.save(final_step)

    def summary(self) -> dict[str, Any]:
        """run_summary.json's `train` figures the session knows (the best evaluation's among them)."""
        best = self.selection.summary()
        out = {"compile_s": self.compile_s, "step_memory_bytes": self.step_memory or None}
        return {**out, "devices": self.mesh.devices.size, **({"best": best} if best else {})}

    def final_model(self):
        """The model the run hands on: the best evaluation's params when selection picked one (and
        `final_model: best`), else the last step's."""
        best_step = self.selection.best_step
        if self.best is None or best_step is None or self.cfg.final_model == "last":
            return self.model
        self.best.manager.wait_until_finished()
        _, params, _ = self.best.restore(abstract_like(self.state.params), step=best_step)
        log.info("final model: the best evaluation's, step %d (%s %.4f)", best_step, self.selection.metric,
                 self.selection.best_value)  # fmt: skip
        return eqx.combine(params, self.static)

    def close(self) -> None:
        self.ckpt.close()
        if self.best is not None:
            self.best.close()


def _tracker_key(key: str) -> str:
    """W&B names of held-out results: the held-out loss stays `eval/loss` (`eval_loss/<task>` -> `eval/loss/<task>`)."""
    return "eval/loss" + key.removeprefix("eval_loss") if key.startswith("eval_loss") else key


def fit(
    *,
    model,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    lr_schedule: Callable[[Array], Array],
    batches: BatchIterator,
    total_steps: int,
    cfg: TrainConfig,
    mesh: Mesh,
    run: RunDir,
    tracker: Tracker,
    flops: TrainFlops | None = None,
    evaluators: Sequence[Evaluator] = (),
    step_stats: Callable[[dict[str, Any]], dict[str, float]] = task_losses,
    bar_stats: Sequence[str] = (),
) -> tuple[Any, dict[str, Any]]:
    """Train `model` for `total_steps` optimizer steps (resuming from the newest checkpoint when cfg.resume);
    returns the model to hand on (`_Session.final_model`) and run_summary.json's `train` section. `step_stats` turns
    a step's host metrics into the extra figures each log records; the progress bar shows those `bar_stats` names."""
    t_start = time.perf_counter()
    session = _Session(model, loss_fn, optimizer, lr_schedule, batches, cfg, mesh, run)
    if hasattr(batches, "attach"):
        batches.attach(lambda: session.model)
    if cfg.eval_at_start and session.start == 0 and (scheduled := [e for e in evaluators if e.every]):
        session.evaluate(0, scheduled, run, tracker)
    meter = Meter(
        run=run, tracker=tracker, total_steps=total_steps, start=session.start, log_every=cfg.log_every,
        flops=flops, n_devices=mesh.devices.size, progress_bar=cfg.progress_bar,
        last_good=session.describe_last_saved, step_stats=step_stats, bar_stats=bar_stats,
    )  # fmt: skip
    summary: dict[str, Any] = {"steps": total_steps, "micro_steps": total_steps * cfg.grad_accum_steps,
                               "start_step": session.start}  # fmt: skip
    with _Preemption() as preempt:
        try:
            for done in range(session.start + 1, total_steps + 1):
                meter.push(done, session.step(next(batches)))
                # Evaluate before saving: a checkpoint of step `done` then holds the selection with its evaluation.
                if scheduled := due(evaluators, done, total_steps):
                    with meter.paused():
                        session.evaluate(done, scheduled, run, tracker)
                    if session.selection.should_stop:
                        summary.update(early_stopped_at=done)
                        break
                if cfg.save_every and done % cfg.save_every == 0 and done != total_steps:
                    with meter.paused():
                        session.save(done)
                if preempt.stop_after(done):
                    with meter.paused():
                        session.save(done, wait=True)
                    summary.update(preempted_at=done)
                    break
            meter.finish()
            session.save_final(total_steps, summary)
            final = session.final_model()
        finally:
            meter.close()
            session.close()
    summary.update(**meter.summary(), **session.summary(), wall_s=time.perf_counter() - t_start)
    return final, summary
