"""The one training loop (SFT and nanoGPT share it): a jitted, sharded, donated step with in-step gradient
accumulation; logging, progress bar, W&B; orbax checkpoints with exact resume; SIGTERM and NaN handling."""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array

from sid.checkpoint import Checkpointer, abstract_like
from sid.config import ConfigError
from sid.errors import NonFiniteLoss
from sid.models.flops import TrainFlops
from sid.optim.config import OptimizerConfig
from sid.optim.routing import routing_table
from sid.optim.schedule import make_schedule
from sid.parallel.mesh import BATCH_AXES, batch_sharding
from sid.parallel.opt_state import state_shardings
from sid.parallel.report import device_bytes, format_bytes, sharding_table
from sid.parallel.rules import param_shardings, without_axis
from sid.parallel.trace import REPLICAS, constrain_batch, per_replica, traced_on
from sid.run import RunDir, require_shared_directory
from sid.tracking import Tracker
from sid.trainer_config import TrainConfig

log = logging.getLogger("sid")

LossFn = Callable[[Any, dict[str, Array], Array], tuple[Array, Array]]
"""(model, micro-batch, dropout key) -> (sum of token losses, number of supervised tokens)."""


class BatchIterator(Protocol):
    """What the trainer consumes: host-local numpy batches and a JSON-able state for exact resume."""

    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


class TrainState(eqx.Module):
    """Everything a step changes: params (array leaves of the model), optimizer state, step, base RNG key."""

    params: Any
    opt_state: Any
    step: Array
    key: Array


_PEAK_FLOPS = {  # dense bf16 per device
    "h100": 989e12,
    "h200": 989e12,
    "a100": 312e12,
    "tpu v6": 918e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5": 459e12,
    "tpu v4": 275e12,
}


def peak_flops_per_device() -> float | None:
    """Peak bf16 FLOP/s of the local device kind, or None where unknown (e.g. CPU): MFU is then not reported."""
    kind = jax.devices()[0].device_kind.lower()
    return next((v for k, v in _PEAK_FLOPS.items() if k in kind), None)


def _accumulate(static, loss_fn: LossFn, params, batch, key, accum: int, mesh: Mesh, param_sharding, gather_once: bool):
    """Gradients and loss of the token-weighted mean over all `accum` micro-batches (accumulated in f32).

    By default the accumulator is sharded like the params, so FSDP never holds a full copy: each micro-batch gathers
    the weights it uses and reduce-scatters its gradients over fsdp. With dp > 1 each replica accumulates its own
    rows' gradients and the replicas sum them once per step (one all-reduce over dp), not once per micro-batch as a
    plain batch-split grad would: dp runs across hosts, where that traffic is the slowest.

    `gather_once` does the same over fsdp: the f32 params are gathered once per step and each device accumulates
    the whole gradient of its own rows, reduced over fsdp once per step. That is one params-sized gather and one
    reduce per step instead of two gathers (forward, backward) and one reduce per micro-batch, for a whole copy of
    the params and a whole f32 gradient accumulator on every device.

    Each replica draws its own dropout masks (as in any data-parallel trainer), so with dropout the losses depend on
    the replicas; without it, every mesh and mode computes the same step up to float order."""
    param_specs = jax.tree.map(lambda s: s.spec, param_sharding)
    replica_axes = tuple(a for a in BATCH_AXES if mesh.shape[a] > 1 and (a == "dp" or gather_once))
    inner_specs = param_specs
    if "fsdp" in replica_axes:
        inner_specs = jax.tree.map(lambda s: without_axis(s, "fsdp"), param_specs)
        with jax.named_scope("gather_params_once"):
            params = jax.lax.with_sharding_constraint(params, inner_specs)
    replicas = math.prod(mesh.shape[a] for a in replica_axes)
    if replicas == 1:
        g, l, n = _accumulate_rows(static, loss_fn, params, batch, key, accum, inner_specs)
    else:
        # [replicas * rows, ...] -> [replicas, rows, ...]: each replica's rows are already on its devices.
        replica_rows = jax.tree.map(lambda x: x.reshape(replicas, -1, *x.shape[1:]), batch)
        with per_replica(replica_axes):
            sums = jax.vmap(
                lambda rows, k: _accumulate_rows(static, loss_fn, params, rows, k, accum, inner_specs),
                axis_name=REPLICAS,  # for `replicas_max`
                spmd_axis_name=replica_axes,  # every sharding constraint inside splits the replica axis over these
            )(replica_rows, jax.random.split(key, replicas))
        with jax.named_scope("replica_gradient_sum"):
            g, l, n = jax.tree.map(lambda x: x.sum(0), sums)
            g = jax.lax.with_sharding_constraint(g, param_specs)
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    return jax.tree.map(lambda x: x / denom, g), l / denom, n


def _accumulate_rows(static, loss_fn: LossFn, params, batch, key, accum: int, param_specs):
    """Sums over `accum` micro-batches of `batch`'s rows: (f32 gradients, token loss, supervised tokens)."""

    def micro(carry, xs):
        g_acc, l_acc, n_acc = carry
        mb, k = xs
        mb = jax.tree.map(constrain_batch, mb)

        def f(p):
            return loss_fn(eqx.combine(p, static), mb, k)

        (l, n), g = jax.value_and_grad(f, has_aux=True)(params)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        g_acc = jax.lax.with_sharding_constraint(g_acc, param_specs)
        return (g_acc, l_acc + l, n_acc + n), None

    # Each device's contiguous rows hold all micro-batches, so splitting them needs no communication.
    micro_batches = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
    zeros = jax.lax.with_sharding_constraint(
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), param_specs
    )
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    sums, _ = jax.lax.scan(micro, init, (micro_batches, jax.random.split(key, accum)))
    return sums


def step_memory_bytes(compiled) -> int | None:
    """XLA's static footprint of a compiled step on one device: arguments + outputs - donated (aliased) buffers +
    temporaries. None where the backend gives no memory analysis."""
    a = compiled.memory_analysis()
    if a is None:
        return None
    return int(a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes + a.temp_size_in_bytes)


def device_memory_limit() -> int | None:
    """Bytes a local device can allocate (None where the backend has no allocator stats, e.g. CPU)."""
    return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")


def log_step_memory(need: int | None, signature: tuple, seconds: float) -> None:
    """One line per compiled step shape: how long it took and what it needs per device (`step_memory_bytes`),
    against what the device has where the backend says (a mode such as `train.gather_params_once` shows its cost
    here before a long run)."""
    shapes = ", ".join(f"{k} {tuple(shape)}" for k, shape in signature if k == "input_ids") or str(signature)
    limit = device_memory_limit()
    memory = "" if need is None else f": {format_bytes(need)} per device"
    if need is not None and limit:
        memory += f" of {format_bytes(limit)} ({100 * need / limit:.0f}%)"
    log.info("train step for %s compiled in %.1f s%s", shapes, seconds, memory)


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


def make_train_step(
    static,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    accum: int,
    mesh: Mesh,
    state_sharding,
    lr_schedule: Callable[[Array], Array],
    gather_once: bool = False,
):
    """The jitted step `(state, batch) -> (state, metrics)`; state is donated, batch sharded over (dp, fsdp).
    `gather_once`: gather the params once per step and reduce gradients once per step (`_accumulate`)."""

    def step(state: TrainState, batch: dict[str, Array]):
        key = jax.random.fold_in(state.key, state.step)
        grads, loss, n_tokens = _accumulate(
            static, loss_fn, state.params, batch, key, accum, mesh, state_sharding.params, gather_once
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "lr": lr_schedule(state.step),
            "supervised_tokens": n_tokens,
            "tokens": _real_tokens(batch),
        }
        return TrainState(params, opt_state, state.step + 1, state.key), metrics

    return jax.jit(
        traced_on(mesh, step),
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, None),
        donate_argnums=0,
    )


def _real_tokens(batch: dict[str, Array]) -> Array:
    """Non-padding tokens (what tokens/s counts): segment id > 0 where rows are packed or padded."""
    if "segment_ids" in batch:
        return (batch["segment_ids"] > 0).sum()
    return jnp.asarray(batch["input_ids"].size, jnp.int32)


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


def init_state(model, optimizer: optax.GradientTransformation, *, seed: int, mesh: Mesh):
    """Shard the model's arrays over the mesh and initialise the optimizer state in place (sharded)."""
    params, static = eqx.partition(model, eqx.is_array)
    p_shard = param_shardings(params, mesh)
    params = jax.device_put(params, p_shard)
    abstract_opt = jax.eval_shape(optimizer.init, params)
    o_shard = state_shardings(abstract_opt, params, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=o_shard)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    state = TrainState(
        params,
        opt_state,
        jax.device_put(jnp.zeros((), jnp.int32), replicated),
        jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated),
    )
    sharding = TrainState(p_shard, o_shard, replicated, replicated)
    return state, static, sharding


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, Array]:
    """Host-local numpy rows -> global jax arrays sharded over (dp, fsdp)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


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
    eval_loss: Callable[[Any, int], float] | None = None,
    on_eval: Callable[[int, float, Any], None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train `model` for `total_steps` optimizer steps; returns the trained model and the `train` summary.

    `eval_loss(model, step)` is called every cfg.eval_loss_every steps and `on_eval(step, loss, model)` after it
    (e.g. to keep the best model). Resumes from the newest checkpoint when cfg.resume.
    """
    accum = cfg.grad_accum_steps
    state, static, sharding = init_state(model, optimizer, seed=cfg.seed, mesh=mesh)
    log.info(
        "params over mesh %s:\n%s",
        dict(mesh.shape),
        sharding_table(state.params, sharding.params, state.opt_state, sharding.opt_state),
    )
    if cfg.gather_params_once:
        log.info("%s", gather_once_note(state.params, sharding.params, mesh))
    require_shared_directory(run.path)
    ckpt = Checkpointer(run.path / CHECKPOINT_DIR, keep=cfg.keep_checkpoints)
    start = 0
    if cfg.resume and ckpt.latest_step() is not None:
        start, state, data_state = ckpt.restore(abstract_like(state))
        batches.set_state(data_state)
        log.info("resumed from checkpoint step %d", start)
    elif cfg.resume:
        log.info("resume requested but %s holds no checkpoint: starting fresh", ckpt.directory)
    step_fn = make_train_step(
        static,
        loss_fn,
        optimizer,
        accum=accum,
        mesh=mesh,
        state_sharding=sharding,
        lr_schedule=lr_schedule,
        gather_once=cfg.gather_params_once,
    )
    peak = peak_flops_per_device()
    n_devices = mesh.devices.size
    summary: dict[str, Any] = {"steps": total_steps, "micro_steps": total_steps * accum, "start_step": start}
    compiled: dict[tuple, Any] = {}
    compile_s, step_memory = 0.0, 0
    tokens_done, targets_done, timed_s, timed_steps, last_loss = 0, 0, 0.0, 0, float("nan")
    pending = None  # (step, metrics) of the previous step, fetched one step late to keep dispatch async
    last_saved = start if start else None
    bar = None
    if cfg.progress_bar and run.main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start, dynamic_ncols=True, desc="train")
    t_start = time.perf_counter()
    t_last = t_start

    def save(step_done: int, *, wait: bool = False) -> None:
        nonlocal last_saved
        ckpt.save(step_done, state, batches.get_state(), wait=wait)
        last_saved = step_done

    def finish_pending() -> None:
        nonlocal pending, tokens_done, targets_done, timed_s, timed_steps, last_loss, t_last
        if pending is None:
            return
        step_done, metrics = pending
        pending = None
        m = jax.device_get(metrics)
        loss = float(m["loss"])
        if not math.isfinite(loss):
            raise NonFiniteLoss(
                f"non-finite loss {loss} at step {step_done}; stopped. Last good checkpoint: "
                f"{last_saved if last_saved is not None else 'none'} in {ckpt.directory}"
            )
        last_loss = loss
        now = time.perf_counter()
        dt = now - t_last
        t_last = now
        n_tok = int(m["tokens"])
        if step_done > start + 1:  # the first step includes compilation
            tokens_done += n_tok
            targets_done += int(m["supervised_tokens"])
            timed_s += dt
            timed_steps += 1
        tps = tokens_done / timed_s if timed_s > 0 else 0.0
        mfu = flops(tokens_done, targets_done) / timed_s / (peak * n_devices) if peak and flops and timed_s else None
        if bar is not None:
            post = {"loss": f"{loss:.4f}", "lr": f"{float(m['lr']):.2e}", "tok/s": f"{tps:,.0f}"}
            if mfu is not None:
                post["mfu"] = f"{100 * mfu:.1f}%"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
        if step_done % cfg.log_every == 0 or step_done == total_steps:
            record = {
                "step": step_done,
                "loss": loss,
                "lr": float(m["lr"]),
                "grad_norm": float(m["grad_norm"]),
                "tokens_per_s": tps,
                "step_time_s": dt,
                "mfu": mfu,
            }
            run.append_metrics(record)
            tracker.log(
                {
                    "train/loss": loss,
                    "train/lr": record["lr"],
                    "train/grad_norm": record["grad_norm"],
                    "perf/tokens_per_s": tps,
                    **({"perf/mfu": mfu} if mfu is not None else {}),
                },
                step_done,
            )
            if bar is None:
                log.info(
                    "step %d/%d loss %.4f lr %.2e grad_norm %.3f tok/s %.0f",
                    step_done,
                    total_steps,
                    loss,
                    record["lr"],
                    record["grad_norm"],
                    tps,
                )

    with _Preemption() as preempt:
        try:
            for step in range(start, total_steps):
                batch = to_global(next(batches), mesh)
                signature = tuple((k, v.shape) for k, v in sorted(batch.items()))
                if signature not in compiled:
                    t0 = time.perf_counter()
                    compiled[signature] = step_fn.lower(state, batch).compile()
                    seconds = time.perf_counter() - t0
                    compile_s += seconds
                    need = step_memory_bytes(compiled[signature])
                    log_step_memory(need, signature, seconds)
                    step_memory = max(step_memory, need or 0)
                state, metrics = compiled[signature](state, batch)
                finish_pending()
                pending = (step + 1, metrics)
                done = step + 1
                if cfg.save_every and done % cfg.save_every == 0 and done != total_steps:
                    finish_pending()
                    save(done)
                if cfg.eval_loss_every and eval_loss is not None and done % cfg.eval_loss_every == 0:
                    finish_pending()
                    current = eqx.combine(state.params, static)
                    val = eval_loss(current, done)
                    log.info("step %d eval loss %.4f", done, val)
                    run.append_metrics({"step": done, "eval_loss": val})
                    tracker.log({"eval/loss": val}, done)
                    if on_eval is not None:
                        on_eval(done, val, current)
                    t_last = time.perf_counter()  # the held-out pass is not training time
                if preempt.stop_after(done):
                    finish_pending()
                    save(done, wait=True)
                    summary.update(preempted_at=done)
                    log.warning("preempted: checkpoint %d saved", done)
                    break
            finish_pending()
            final_step = int(jax.device_get(state.step))
            if cfg.save_last and final_step == total_steps and last_saved != final_step:
                save(final_step)
        finally:
            if bar is not None:
                bar.close()
            ckpt.close()
    wall = time.perf_counter() - t_start
    summary.update(
        final_step=int(jax.device_get(state.step)),
        final_loss=last_loss,
        tokens_per_s=tokens_done / timed_s if timed_s > 0 else None,
        step_time_s=timed_s / timed_steps if timed_steps else None,
        wall_s=wall,
        compile_s=compile_s,
        step_memory_bytes=step_memory or None,
        devices=n_devices,
    )
    return eqx.combine(state.params, static), summary
