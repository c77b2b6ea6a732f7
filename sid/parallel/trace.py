"""What a model sees while traced under a mesh (`traced_on`): its rows split over the batch axes, vocab tables split
by rows, and inside the trainer's vmap over replicas (`per_replica`) the split of one replica. Outside a mesh every
function here is the identity, so models run unchanged on one device."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import jax
from jax.sharding import Mesh, PartitionSpec

from sid.parallel.mesh import AXES, BATCH_AXES
from sid.parallel.rules import table_rows

_Args = ParamSpec("_Args")
_Out = TypeVar("_Out")


def traced_on(mesh: Mesh, fn: Callable[_Args, _Out]) -> Callable[_Args, _Out]:
    """`fn`, traced under `mesh`'s abstract mesh so the models' `constrain_batch` calls take effect. Every jitted
    function that runs a model over a mesh (train step, held-out loss, beam search) is wrapped in this."""

    @functools.wraps(fn)
    def wrapped(*args: _Args.args, **kwargs: _Args.kwargs) -> _Out:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped


REPLICAS = "replicas"
"""The axis name of the trainer's vmap over replicas (`per_replica`), for collectives over them (`replicas_max`)."""
_REPLICA_AXES: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("replica_axes", default=())
"""The mesh axes the trainer's vmap over replicas is placed on while tracing one replica (`per_replica`): () outside,
("dp",) for dp replicas, ("dp", "fsdp") when each device accumulates its own gradients."""


def _batch_within() -> tuple[str, ...]:
    """The axes that split one replica's rows: (dp, fsdp) outside `per_replica`, the rest of them inside."""
    return tuple(a for a in BATCH_AXES if a not in _REPLICA_AXES.get())


def _axis_size(mesh, axis: str) -> int:
    """`axis`'s size as one replica sees it: 1 for the axes the replica vmap is placed on (a replica holds its own
    copy of whatever is split over the others, e.g. whole params when fsdp is a replica axis)."""
    return 1 if axis in _REPLICA_AXES.get() else mesh.shape[axis]


def constrain_batch(x: jax.Array) -> jax.Array:
    """Shard dim 0 (the batch) over (dp, fsdp), or the axes that split one replica's rows inside `per_replica`, and
    replicate the rest, when traced under the abstract mesh of a mesh with those axes (`traced_on`); else `x` as is.

    Models call it on the residual stream at every layer, so the partitioner keeps activations split by batch and
    gathers the fsdp-sharded weights, instead of sharding some activations by feature (which forces full
    rematerializations where the two layouts meet, e.g. at RoPE)."""
    if _traced_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(_batch_within()))


@contextlib.contextmanager
def per_replica(axes: tuple[str, ...]):
    """Trace one replica's rows, under `jax.vmap(..., axis_name=REPLICAS, spmd_axis_name=axes)` over the replicas:
    the models' rows split over the remaining batch axes, and nothing inside is split over `axes` (params included:
    with fsdp among them each replica holds whole params)."""
    token = _REPLICA_AXES.set(tuple(axes))
    try:
        yield
    finally:
        _REPLICA_AXES.reset(token)


def replicas_max(x: jax.Array) -> jax.Array:
    """`x`'s max over the replicas while tracing one replica's rows (`per_replica`); else `x`. A value all replicas
    agree on, such as a loop bound, keeps a `lax.cond` on it a branch: on a per-replica value `vmap` turns the cond
    into a select that computes both sides."""
    return jax.lax.pmax(x, REPLICAS) if _REPLICA_AXES.get() else x


def _traced_mesh():
    """The abstract mesh being traced under (`traced_on`), or None outside one (or one without sid's axes)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or not set(AXES) <= set(mesh.axis_names) else mesh


def param_split() -> int:
    """How many ways the params are split (fsdp x tp) under the current abstract mesh; 1 outside one."""
    mesh = _traced_mesh()
    return 1 if mesh is None else _axis_size(mesh, "fsdp") * _axis_size(mesh, "tp")


def batch_split() -> int:
    """How many ways `constrain_batch` splits rows under the current abstract mesh (dp x fsdp, or what of it is left
    inside `per_replica`); 1 outside one."""
    mesh = _traced_mesh()
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in _batch_within())


def constrain_table(table: jax.Array) -> jax.Array:
    """A vocab table `[rows, features]` about to be indexed by token ids: under an abstract mesh, rows split as
    `param_shardings` splits them and features whole; else `table` as is.

    A no-op where the rows take the split. Where they cannot (e.g. a 65-character vocab), the features hold
    fsdp's split: that is gathered here, like any FSDP weight, because a lookup in a feature-split table comes
    out feature-split, and XLA can turn that into the residual stream's batch split only by rematerialising the
    whole activation."""
    mesh = _traced_mesh()
    if mesh is None:
        return table
    rows = table_rows(table.shape[0], _axis_size(mesh, "tp"), _axis_size(mesh, "fsdp"))
    return jax.lax.with_sharding_constraint(table, PartitionSpec(rows, *[None] * (table.ndim - 1)))


@dataclass(frozen=True)
class TableSplit:
    """How a vocab table's rows and the batch are split under the abstract mesh being traced (`table_split`)."""

    mesh: jax.sharding.AbstractMesh
    rows: tuple[str, ...]
    """Mesh axes (of size > 1) that split the table's rows, major first: `param_shardings`' split."""
    batch: tuple[str, ...]
    """Mesh axes that split the batch (`constrain_batch`'s)."""


def table_split(rows: int) -> TableSplit | None:
    """The split of a `rows`-row vocab table under the abstract mesh being traced (`traced_on`), or None where its
    rows are whole on every device (no mesh, or no axis divides them)."""
    mesh = _traced_mesh()
    if mesh is None:
        return None
    axes = table_rows(rows, _axis_size(mesh, "tp"), _axis_size(mesh, "fsdp"))
    if axes is None:
        return None
    return TableSplit(mesh, (axes,) if isinstance(axes, str) else tuple(axes), _batch_within())
