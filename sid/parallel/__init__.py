"""Parallelism over a (dp, fsdp, tp) device mesh, one concern per module:

- `distributed`: joining a multi-process run.
- `mesh`: the axes, building the mesh from `sid.mesh.MeshConfig`, batch shardings.
- `trace`: what a model sees while traced under a mesh (batch and vocab-table constraints, the per-replica vmap).
- `rules`: param shardings from the partition rules each model declares (`PartitionRules`).
- `opt_state`: optimizer-state shardings, matched to the params they mirror.
- `layer_split`: Muon's layout of layer stacks with whole matrices per device.
- `report`: what each device holds (bytes, the per-param table).
- `host`: moving values between the host and sharded arrays.
"""
