"""What each device holds: shard bytes, and the per-param table training logs at start."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import PartitionSpec

from sid.pytree import path_str
from sid.tables import text_table


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
