"""Muon's layout of layer stacks: the (fsdp, tp) split moved from the matrices to the layer axis, so each device
holds whole matrices (of some layers) and Newton–Schulz runs on them without a collective."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from sid.parallel.trace import param_split


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
