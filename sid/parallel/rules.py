"""Param shardings from the partition rules each model declares.

A model class names its tensor-parallel fields in a `partition_rules` class attribute (`PartitionRules`): tp splits
column-parallel fields on their output dim and row-parallel ones on their input dim (attention heads, MLP width);
fsdp then splits the largest remaining dimension it divides. Vocab tables (embeddings, LM head) split their rows over
tp and fsdp together, so lookups stay batch-split. The leading layer axis of scanned stacks is never split.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sid.pytree import path_names


@dataclass(frozen=True)
class PartitionRules:
    """A model's tensor-parallel layout, by field name: the nearest named field on a param's path decides."""

    column: frozenset[str] = frozenset()
    """Linear layers split on their output dim (weight and bias): q/k/v projections, the MLP's up projections."""
    row: frozenset[str] = frozenset()
    """Linear layers split on their input dim (weight only): the projections back to the residual stream."""
    vocab: frozenset[str] = frozenset()
    """Vocab tables (token embeddings, LM head): rows split over tp and fsdp."""


def partition_rules(tree) -> PartitionRules:
    """The rules of the model at `tree`'s root (a model, or its params as `eqx.filter` leaves them). A tree that
    declares none (a toy model: a dict of arrays) has no tensor-parallel fields: fsdp alone splits it."""
    rules = getattr(tree, "partition_rules", PartitionRules())
    if not isinstance(rules, PartitionRules):
        raise TypeError(f"{type(tree).__name__}.partition_rules must be a PartitionRules, got {type(rules).__name__}")
    return rules


def table_rows(rows: int, tp: int, fsdp: int) -> str | tuple[str, ...] | None:
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


def param_spec(rules: PartitionRules, path, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """The split of the param at `path` (of `shape`) under `rules` on `mesh`."""
    names = path_names(path)
    stacked = "layers" in names
    spec: list = [None] * len(shape)
    first = 1 if stacked else 0
    if len(shape) - first < 1:
        return PartitionSpec(*spec)
    tp, fsdp = mesh.shape["tp"], mesh.shape["fsdp"]
    owner = next((n for n in reversed(names) if n in rules.column | rules.row | rules.vocab), None)
    tp_dim = None
    if owner in rules.column:
        tp_dim = len(shape) - 2 if names[-1] == "weight" else len(shape) - 1
    elif owner in rules.row and names[-1] == "weight":
        tp_dim = len(shape) - 1
    elif owner in rules.vocab:
        spec[first] = table_rows(shape[first], tp, fsdp)
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
    """NamedShardings for every array leaf of a model's param pytree (non-arrays map to None), by the model's
    `partition_rules`."""
    rules = partition_rules(tree)

    def one(path, leaf):
        if not hasattr(leaf, "shape"):
            return None
        return NamedSharding(mesh, param_spec(rules, path, tuple(leaf.shape), mesh))

    return jax.tree_util.tree_map_with_path(one, tree)
