"""Moving values between the host and (possibly multi-host) sharded arrays."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from sid.parallel.mesh import batch_sharding


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


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Each process's own rows of a batch (numpy) -> global jax arrays split over (dp, fsdp); `global_array` is for
    a value every process holds in full."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
