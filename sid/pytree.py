"""Names of pytree paths, shared by the rules that read them (optimizer routing, sharding, report tables)."""

from __future__ import annotations

from typing import Any

import jax


def key_name(key: Any) -> str | None:
    """The field/key name of one path entry: an Equinox field or a dict key (None for sequence indices)."""
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.DictKey):
        return str(key.key)
    return None


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The named entries of a path, in order (sequence indices left out), e.g. ``('layers', 'attn', 'q_proj')``."""
    return tuple(name for k in path if (name := key_name(k)) is not None)


def path_str(path: tuple[Any, ...]) -> str:
    """A dotted, human-readable parameter path, e.g. ``layers.attn.q_proj.weight``."""
    parts = []
    for k in path:
        name = key_name(k)
        parts.append(name if name is not None else str(getattr(k, "idx", k)))
    return ".".join(parts)
