"""The device mesh (axes dp, fsdp, tp) and the rules that shard params, optimizer state and batches over it.

Params: tp splits attention heads and MLP width (column-parallel q/k/v/gate/up/c_attn/c_fc on their output dim,
row-parallel o/down/c_proj on their input dim); fsdp then splits the largest remaining dimension it divides.
Vocab tables (embeddings, LM head) split their rows over tp and fsdp together, so lookups stay batch-split.
The leading layer axis of scanned stacks is never split. Batches split over (dp, fsdp).
Optimizer-state leaves take the sharding of the param whose path they end with (moments mirror params).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sid.config import ConfigError
from sid.optim.routing import path_str
from sid.tables import text_table

AXES = ("dp", "fsdp", "tp")
BATCH_AXES = ("dp", "fsdp")
_COLUMN_PARALLEL = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "c_attn", "c_fc"}
_ROW_PARALLEL = {"o_proj", "down_proj", "c_proj"}
_VOCAB = {"embed", "lm_head", "wte"}
_Args = ParamSpec("_Args")
_Out = TypeVar("_Out")


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh. 0 means auto: fsdp over the local devices (divided by tp) and dp over hosts."""

    dp: int = 0
    """Data-parallel replicas."""
    fsdp: int = 0
    """Fully-sharded data-parallel axis (params and optimizer state sharded on their large dimension)."""
    tp: int = 1
    """Tensor-parallel axis (attention heads and MLP width)."""
    distributed: bool = False
    """Call jax.distributed.initialize() first (multi-host runs). On TPU pod slices, SLURM, Open MPI and
    Kubernetes JAX finds the settings below by itself; elsewhere set them (one process per host)."""
    coordinator_address: str = ""
    """host:port of process 0's coordinator ("" = auto-detect)."""
    num_processes: int = 0
    """How many processes take part (0 = auto-detect)."""
    process_id: int = -1
    """This process's index in [0, num_processes) (-1 = auto-detect)."""


def init_distributed(cfg: MeshConfig) -> None:
    """Join the multi-process run when `cfg.distributed` (before any other JAX call touches a device)."""
    if not cfg.distributed:
        return
    if cfg.num_processes and not 0 <= cfg.process_id < cfg.num_processes:
        raise ConfigError(
            f"mesh.process_id={cfg.process_id} must be in [0, mesh.num_processes={cfg.num_processes}) "
            "when mesh.num_processes is set"
        )
    jax.distributed.initialize(
        coordinator_address=cfg.coordinator_address or None,
        num_processes=cfg.num_processes or None,
        process_id=cfg.process_id if cfg.process_id >= 0 else None,
    )


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A (dp, fsdp, tp) mesh over `devices` (default: all), resolving the auto (0) axes.

    Devices are laid out host-major (by process index, then id), so with dp over hosts each dp row is one host's
    devices and each process's devices hold a contiguous block of the batch rows: the block its data loader reads.
    """
    devices = sorted(jax.devices() if devices is None else devices, key=lambda d: (d.process_index, d.id))
    n, tp = len(devices), cfg.tp
    if cfg.dp and cfg.fsdp:
        dp, fsdp = cfg.dp, cfg.fsdp
        hosts = {d.process_index for d in devices}
        devices = devices[: dp * fsdp * tp] if dp * fsdp * tp < n else devices  # fully explicit: use that many
        n = len(devices)
        used = {d.process_index for d in devices}
        if used != hosts:  # the processes left out would hold no shard of anything: they crash and the others hang
            raise ConfigError(
                f"mesh: dp={dp} x fsdp={fsdp} x tp={tp} uses the devices of process(es) {sorted(used)} only, but "
                f"processes {sorted(hosts - used)} take part too; a multi-process run needs every process in the "
                f"mesh: set --mesh.dp 0 --mesh.fsdp 0 (auto) or sizes that use all {len(hosts)} processes' devices"
            )
    elif cfg.fsdp:
        dp, fsdp = n // max(1, cfg.fsdp * tp), cfg.fsdp
    else:
        dp = cfg.dp or jax.process_count()
        fsdp = n // max(1, dp * tp)
    if dp * fsdp * tp != n:
        raise ConfigError(
            f"mesh: dp={cfg.dp or 'auto'} x fsdp={cfg.fsdp or 'auto'} x tp={tp} does not fit {n} devices "
            f"(resolved dp={dp}, fsdp={fsdp})"
        )
    return Mesh(np.asarray(devices).reshape(dp, fsdp, tp), AXES)


def tp_head_warning(tp: int, **heads: int) -> str | None:
    """Why this tp would split attention heads, or None. tp splits q/k/v on their output dim, which stays on head
    boundaries only when tp divides every head count; otherwise each layer's attention re-lays out q/k/v between
    devices (all-to-alls / collective-permutes; the step is still exact, only slower)."""
    split = {name: n for name, n in heads.items() if n % tp}
    if not split:
        return None
    counts = ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in split.items())
    return (
        f"mesh.tp={tp} does not divide the model's {counts}: tp will split heads, and every layer's attention "
        "will move q/k/v between devices; use a tp that divides every head count (or more fsdp instead)"
    )


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


def split_by_layer(x: jax.Array) -> jax.Array:
    """A layer stack ``[layers, ...]`` with whole matrices on each device: under an abstract mesh that splits params,
    the stack is padded with zero layers to a multiple of `param_split()` and the split (fsdp, tp) moves to dim 0;
    else `x` as is (also for leaves without a layer axis). Muon iterates on this layout, where no collective runs.
    `unsplit_by_layer` is the way back."""
    split = param_split()
    if split == 1 or x.ndim < 3:
        return x
    x = jnp.pad(x, ((0, -x.shape[0] % split),) + ((0, 0),) * (x.ndim - 1))
    # One axis at a time: each step is then a plain all-to-all over that axis. Moving both in one constraint (e.g.
    # tp from the rows and fsdp from the columns) is a layout change XLA can only make by replicating the tensor.
    x = jax.lax.with_sharding_constraint(x, _leading("fsdp", x.ndim))
    return jax.lax.with_sharding_constraint(x, PartitionSpec(("fsdp", "tp")))


def unsplit_by_layer(x: jax.Array, layers: int) -> jax.Array:
    """The way back from `split_by_layer` for a stack of `layers`: tp leaves dim 0 first, then fsdp, for the
    partitioner to place as the param is split; the padding is dropped."""
    if param_split() == 1 or x.ndim < 3:
        return x
    x = jax.lax.with_sharding_constraint(x, PartitionSpec(("fsdp", "tp")))
    return jax.lax.with_sharding_constraint(x, _leading("fsdp", x.ndim))[:layers]


def _leading(axis: str, ndim: int) -> PartitionSpec:
    """Dim 0 split over `axis`; the partitioner chooses the rest."""
    return PartitionSpec(axis, *(PartitionSpec.UNCONSTRAINED,) * (ndim - 1))


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
    rows = _table_rows(table.shape[0], _axis_size(mesh, "tp"), _axis_size(mesh, "fsdp"))
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
    axes = _table_rows(rows, _axis_size(mesh, "tp"), _axis_size(mesh, "fsdp"))
    if axes is None:
        return None
    return TableSplit(mesh, (axes,) if isinstance(axes, str) else tuple(axes), _batch_within())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over dp x fsdp; everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards."""
    return mesh.shape["dp"] * mesh.shape["fsdp"]


def _names(path) -> list[str]:
    out = []
    for k in path:
        name = getattr(k, "name", None) or getattr(k, "key", None)
        if isinstance(name, str):
            out.append(name)
    return out


def _table_rows(rows: int, tp: int, fsdp: int) -> str | tuple[str, ...] | None:
    """Mesh axes that split a vocab table's rows: tp and fsdp together where they divide the rows, else the one
    that does (tp first). Rows are split rather than features so that a lookup of batch-split token ids comes out
    batch-split (see `constrain_table`)."""
    if tp * fsdp > 1 and rows % (tp * fsdp) == 0:
        axes = tuple(a for a, n in (("tp", tp), ("fsdp", fsdp)) if n > 1)
        return axes[0] if len(axes) == 1 else axes
    if tp > 1 and rows % tp == 0:
        return "tp"
    if fsdp > 1 and rows % fsdp == 0:
        return "fsdp"
    return None


def _param_spec(path, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    names = _names(path)
    stacked = "layers" in names
    spec: list = [None] * len(shape)
    first = 1 if stacked else 0
    if len(shape) - first < 1:
        return PartitionSpec(*spec)
    tp, fsdp = mesh.shape["tp"], mesh.shape["fsdp"]
    owner = next((n for n in reversed(names) if n in _COLUMN_PARALLEL | _ROW_PARALLEL | _VOCAB), None)
    tp_dim = None
    if owner in _COLUMN_PARALLEL:
        tp_dim = len(shape) - 2 if names[-1] == "weight" else len(shape) - 1
    elif owner in _ROW_PARALLEL and names[-1] == "weight":
        tp_dim = len(shape) - 1
    elif owner in _VOCAB:
        spec[first] = _table_rows(shape[first], tp, fsdp)
    if tp > 1 and tp_dim is not None and tp_dim >= first and shape[tp_dim] % tp == 0:
        spec[tp_dim] = "tp"
    used = {a for s in spec if s is not None for a in ((s,) if isinstance(s, str) else s)}
    if fsdp > 1 and "fsdp" not in used:
        free = [d for d in range(first, len(shape)) if spec[d] is None and shape[d] % fsdp == 0]
        if free:
            spec[max(free, key=lambda d: shape[d])] = "fsdp"
    return PartitionSpec(*spec)


def without_axis(spec: PartitionSpec, axis: str) -> PartitionSpec:
    """`spec` with `axis` removed from every dim: what a device holds once that axis's split is gathered."""

    def dim(d):
        if d is None or isinstance(d, str):
            return None if d == axis else d
        rest = tuple(a for a in d if a != axis)
        return rest[0] if len(rest) == 1 else rest or None

    return PartitionSpec(*(dim(d) for d in spec))


def param_shardings(tree, mesh: Mesh):
    """NamedShardings for every array leaf of a param pytree (non-arrays map to None)."""

    def one(path, leaf):
        if not hasattr(leaf, "shape"):
            return None
        return NamedSharding(mesh, _param_spec(path, tuple(leaf.shape), mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def state_shardings(state, params, mesh: Mesh):
    """Shardings for an optimizer state: a leaf whose path ends with a param's path (and has its shape)
    is sharded like that param; every other leaf (counts, scalars) is replicated."""
    by_path = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if hasattr(leaf, "shape"):
            by_path[tuple(_names(path))] = (tuple(leaf.shape), _param_spec(path, tuple(leaf.shape), mesh))
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        if not hasattr(leaf, "shape"):
            return None
        names = tuple(_names(path))
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return NamedSharding(mesh, hit[1])
        return replicated

    return jax.tree_util.tree_map_with_path(one, state)


def sharding_table(params, param_sharding, opt_state, opt_sharding) -> str:
    """A printable table of where every param lives (its split, and the shard one device holds), and one line of
    what a device holds in all: the params' and the optimizer state's shard bytes (what sizes a mesh for a model)."""
    rows = []
    param_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    for (path, leaf), sharding in zip(param_leaves, jax.tree.leaves(param_sharding), strict=True):
        shard = sharding.shard_shape(tuple(leaf.shape))
        rows.append((path_str(path), str(tuple(leaf.shape)), _spec_str(sharding.spec), str(tuple(shard))))
    total = (
        f"per device: params {format_bytes(device_bytes(params, param_sharding))} + optimizer state "
        f"{format_bytes(device_bytes(opt_state, opt_sharding))}"
    )
    return text_table(("param", "shape", "split", "per device"), rows) + "\n" + total


def device_bytes(tree, shardings) -> int:
    """Bytes one device holds of the arrays (or shape structs) of `tree`, split by the matching `shardings`."""
    leaves = jax.tree.leaves(tree)
    return sum(
        int(np.prod(s.shard_shape(tuple(x.shape)))) * np.dtype(x.dtype).itemsize
        for x, s in zip(leaves, jax.tree.leaves(shardings), strict=True)
    )


def format_bytes(n: int) -> str:
    """`n` bytes in GiB, or MiB below one GiB, for logs."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _spec_str(spec: PartitionSpec) -> str:
    """A spec as its dims, e.g. `(-, tp, fsdp)` (`-`: whole; `tp+fsdp`: split over both)."""
    dims = ["-" if d is None else "+".join(d) if isinstance(d, tuple) else d for d in spec]
    return "(" + ", ".join(dims) + ")" if dims else "()"


def global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value that every process holds in full (e.g. an eval batch)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(tree):
    """Numpy copies of a pytree of (possibly multi-host sharded) arrays, complete on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)
