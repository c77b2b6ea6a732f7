"""Joining a multi-process run (one process per host) before JAX touches a device."""

from __future__ import annotations

import jax

from sid.config import MeshConfig
from sid.errors import ConfigError


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
