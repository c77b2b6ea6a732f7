"""Optimizer-state shardings: a moment mirrors its param, so it takes the param's sharding."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sid.parallel.rules import param_spec, partition_rules
from sid.pytree import path_names


def state_shardings(state, params, mesh: Mesh):
    """Shardings for an optimizer state: a leaf whose path ends with a param's path (and has its shape)
    is sharded like that param; every other leaf (counts, scalars) is replicated."""
    rules = partition_rules(params)
    by_path = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if hasattr(leaf, "shape"):
            by_path[path_names(path)] = (tuple(leaf.shape), param_spec(rules, path, tuple(leaf.shape), mesh))
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        if not hasattr(leaf, "shape"):
            return None
        names = path_names(path)
        for start in range(len(names)):
            hit = by_path.get(names[start:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return NamedSharding(mesh, hit[1])
        return replicated

    return jax.tree_util.tree_map_with_path(one, state)
