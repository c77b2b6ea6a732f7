"""Which update rule and which weight decay each parameter gets, decided from its pytree path and shape.

The contract shared with the models: a parameter is a *hidden matrix* (→ Muon) iff its path goes through a field
named ``layers`` (the stacked, scanned decoder blocks) and it has ndim == 3, i.e. ``[num_layers, out, in]``.
Everything else — token/position embeddings, the LM head, norms, biases — goes to AdamW (at the aux learning rate
under Muon). Weight decay applies to matrices only: a leaf whose per-layer shape (the shape without the leading
layer axis when it sits under ``layers``) has ndim ≥ 2. Stacked norms ``[L, D]`` and biases ``[L, out]`` are
therefore never decayed, although they are 2-D arrays.

Works on any pytree whose keys have names: Equinox modules (``GetAttrKey``), dicts (``DictKey``), and whatever
optax inserts in between (``MaskedNode`` subtrees have no leaves and are left alone).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import numpy as np
import optax

from sid.pytree import key_name, path_str
from sid.tables import text_table

MUON = "muon"
ADAMW = "adamw"


def _under_layers(path: tuple[Any, ...]) -> bool:
    return any(key_name(k) == "layers" for k in path)


def _is_hidden_matrix(path: tuple[Any, ...], leaf: Any) -> bool:
    return _under_layers(path) and np.ndim(leaf) == 3


def _is_matrix(path: tuple[Any, ...], leaf: Any) -> bool:
    per_layer_ndim = np.ndim(leaf) - (1 if _under_layers(path) else 0)
    return per_layer_ndim >= 2


def route(muon_branch: optax.GradientTransformation, adamw_branch: optax.GradientTransformation):
    """One optimizer from two branches: `muon_branch` on the hidden matrices, `adamw_branch` on every other leaf."""
    return optax.partition({MUON: muon_branch, ADAMW: adamw_branch}, label_params)


def label_params(params: Any) -> Any:
    """A pytree like `params` with ``'muon'`` at every hidden matrix and ``'adamw'`` at every other leaf."""
    return jax.tree_util.tree_map_with_path(lambda p, x: MUON if _is_hidden_matrix(p, x) else ADAMW, params)


def decay_mask(params: Any) -> Any:
    """A pytree like `params` with True where decoupled weight decay applies (matrices), False elsewhere."""
    return jax.tree_util.tree_map_with_path(_is_matrix, params)


def routing_table(params: Any, *, optimizer: Literal["adamw", "muon_local", "muon_optax"] = "muon_local") -> str:
    """A printable table of every parameter: path, shape, update rule, learning-rate group, weight decay.

    Under ``adamw`` every leaf takes AdamW at the train learning rate (``lr``); under the Muon optimizers hidden
    matrices take Muon at ``lr`` and the rest AdamW at ``aux_lr``. The last line counts parameters per group.
    """
    muon = optimizer != "adamw"
    rows = []
    counts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        hidden = muon and _is_hidden_matrix(path, leaf)
        group = MUON if hidden else ADAMW
        lr_group = "lr" if hidden or not muon else "aux_lr"
        rows.append(
            (path_str(path), str(tuple(np.shape(leaf))), group, lr_group, "yes" if _is_matrix(path, leaf) else "no")
        )
        counts[group] = counts.get(group, 0) + int(np.size(leaf))
    table = text_table(("param", "shape", "group", "lr group", "decay"), rows)
    return table + "\n" + ", ".join(f"{g}: {n:,} params" for g, n in sorted(counts.items()))
