"""`MeshConfig`, the device mesh's section of a job. The mesh itself, and the rules that shard params, optimizer state
and batches over it, are in `sid.parallel`."""

from __future__ import annotations

from dataclasses import dataclass


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
