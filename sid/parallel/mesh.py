"""The device mesh: axes dp (data-parallel replicas), fsdp (params and optimizer state sharded, batch split) and tp
(attention heads and MLP width), built from `sid.mesh.MeshConfig`, and the batch's sharding over it."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sid.config import MeshConfig
from sid.errors import ConfigError

AXES = ("dp", "fsdp", "tp")
BATCH_AXES = ("dp", "fsdp")


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


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over dp x fsdp; everything else replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards."""
    return mesh.shape["dp"] * mesh.shape["fsdp"]
