"""The pure train step: `(state, batch) -> (state, metrics)`, jitted, sharded over the mesh and donated, with
in-step gradient accumulation. It knows nothing of loops, logging or files (sid.trainer drives it)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array

from sid.parallel.mesh import BATCH_AXES, batch_sharding
from sid.parallel.opt_state import state_shardings
from sid.parallel.rules import param_shardings, without_axis
from sid.parallel.trace import REPLICAS, constrain_batch, per_replica, traced_on

LossFn = Callable[[Any, dict[str, Array], Array], tuple]
"""(model, micro-batch, dropout key) -> (sum of token losses, number of supervised tokens[, stats]): `stats`, when
given, is a dict of additive scalars (e.g. `loss_sum/<task>`, `tokens/<task>`) summed over the step like the loss."""


class TrainState(eqx.Module):
    """Everything a step changes: params (array leaves of the model), optimizer state, step, base RNG key."""

    params: Any
    opt_state: Any
    step: Array
    key: Array


def _loss_and_stats(loss_fn: LossFn, model, batch, key):
    """`loss_fn`'s (loss sum, (count, stats)), with stats {} for a loss that returns only (sum, count)."""
    out = loss_fn(model, batch, key)
    return out[0], (out[1], out[2] if len(out) > 2 else {})


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
        g, l, n, stats = _accumulate_rows(static, loss_fn, params, batch, key, accum, inner_specs)
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
            g, l, n, stats = jax.tree.map(lambda x: x.sum(0), sums)
            g = jax.lax.with_sharding_constraint(g, param_specs)
    denom = jnp.maximum(n, 1).astype(jnp.float32)
    return jax.tree.map(lambda x: x / denom, g), l / denom, n, stats


def _accumulate_rows(static, loss_fn: LossFn, params, batch, key, accum: int, param_specs):
    """Sums over `accum` micro-batches of `batch`'s rows: (f32 gradients, token loss, supervised tokens, stats)."""

    def micro(carry, xs):
        g_acc, l_acc, n_acc, s_acc = carry
        mb, k = xs
        mb = jax.tree.map(constrain_batch, mb)

        def f(p):
            return _loss_and_stats(loss_fn, eqx.combine(p, static), mb, k)

        (l, (n, s)), g = jax.value_and_grad(f, has_aux=True)(params)
        g_acc = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), g_acc, g)
        g_acc = jax.lax.with_sharding_constraint(g_acc, param_specs)
        return (g_acc, l_acc + l, n_acc + n, jax.tree.map(jnp.add, s_acc, s)), None

    # Each device's contiguous rows hold all micro-batches, so splitting them needs no communication.
    micro_batches = jax.tree.map(lambda x: x.reshape(-1, accum, *x.shape[1:]).swapaxes(0, 1), batch)
    zeros = jax.lax.with_sharding_constraint(
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params), param_specs
    )
    keys = jax.random.split(key, accum)
    first = jax.tree.map(lambda x: x[0], micro_batches)
    # The stats' structure comes from tracing the loss once (nothing runs: eval_shape).
    _, (_, stats_shape) = jax.eval_shape(
        lambda p: _loss_and_stats(loss_fn, eqx.combine(p, static), first, keys[0]), params
    )
    no_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32), no_stats)
    sums, _ = jax.lax.scan(micro, init, (micro_batches, keys))
    return sums


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
        grads, loss, n_tokens, stats = _accumulate(
            static, loss_fn, state.params, batch, key, accum, mesh, state_sharding.params, gather_once
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.global_norm(grads),
            "update_norm": optax.global_norm(updates),
            "lr": lr_schedule(state.step),
            "supervised_tokens": n_tokens,
            "tokens": _real_tokens(batch),
        }
        if clash := metrics.keys() & stats.keys():
            raise ValueError(f"the loss's stats {sorted(clash)} would overwrite the step's own figures: rename them")
        return TrainState(params, opt_state, state.step + 1, state.key), metrics | stats

    return jax.jit(
        traced_on(mesh, step),
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, None),
        donate_argnums=0,
    )


def _real_tokens(batch: dict[str, Array]) -> Array:
    """Non-padding tokens (what tokens/s counts): segment id != 0 where rows are packed or padded (the RL stage's
    prompts are in a negative segment, `sid.rl.rollout.group_rows`)."""
    if "segment_ids" in batch:
        return (batch["segment_ids"] != 0).sum()
    return jnp.asarray(batch["input_ids"].size, jnp.int32)


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


def step_memory_bytes(compiled) -> int | None:
    """XLA's static footprint of a compiled step on one device: arguments + outputs - donated (aliased) buffers +
    temporaries. None where the backend gives no memory analysis."""
    a = compiled.memory_analysis()
    if a is None:
        return None
    return int(a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes + a.temp_size_in_bytes)
