"""Make every item's SID unique, deterministically, and measure how the codes are used.

Two fixes (`collisions` option):
- reassign (default): the SIDs keep their number of levels. In each group of items that share a full SID, the
  item nearest its last-level code keeps it; the others, one by one (nearest first, ties by item order), move to
  the nearest last-level code whose full SID is still free. Fails when a prefix has more items than codes.
- extra_level: one more level is appended whose code is the item's rank within its group (0 for items alone),
  in item order; the SID's meaning is unchanged and a unique SID always exists.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal

import numpy as np

from sid.config import ConfigError

Fix = Literal["reassign", "extra_level"]


class CollisionError(ConfigError):
    """The codes cannot be made unique at this codebook size (a configuration problem: too few codes)."""


def collision_stats(codes: np.ndarray) -> dict[str, float | int]:
    """Distinct SIDs, items sharing their SID with another item, and the collision rate 1 - distinct / items."""
    _, inverse, counts = np.unique(codes, axis=0, return_inverse=True, return_counts=True)
    shared = int((counts[inverse.ravel()] > 1).sum())
    n = codes.shape[0]
    return {"items": n, "distinct_sids": len(counts), "items_sharing_a_sid": shared, "rate": 1.0 - len(counts) / n}


def codebook_use(codes: np.ndarray, codebook_size: int) -> list[dict[str, float | int]]:
    """Per level: codes used, their fraction of the codebook, and the perplexity exp(entropy) of the code counts."""
    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        p = counts[counts > 0] / counts.sum()
        out.append(
            {
                "used": int((counts > 0).sum()),
                "fraction": float((counts > 0).sum() / codebook_size),
                "perplexity": float(np.exp(-(p * np.log(p)).sum())),
                "largest": int(counts.max()),
            }
        )
    return out


def _groups(codes: np.ndarray) -> list[list[int]]:
    """Items grouped by full SID (groups of two or more only), groups in SID order, items ascending."""
    by_sid: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, row in enumerate(map(tuple, codes.tolist())):
        by_sid[row].append(i)
    return [items for _, items in sorted(by_sid.items()) if len(items) > 1]


def reassign(codes: np.ndarray, last_distances: np.ndarray) -> np.ndarray:
    """The `reassign` fix (module docstring); `last_distances` [items, k] ranks each item's last-level codes."""
    out = codes.copy()
    taken = {tuple(row) for row in codes.tolist()}
    k = last_distances.shape[1]
    for items in _groups(codes):
        own = last_distances[items, codes[items, -1]]
        order = sorted(range(len(items)), key=lambda j: (own[j], items[j]))
        prefix = tuple(codes[items[0], :-1].tolist())
        for j in order[1:]:
            i = items[j]
            for code in np.lexsort((np.arange(k), last_distances[i])):
                if prefix + (int(code),) not in taken:
                    break
            else:
                raise CollisionError(
                    f"SID prefix {prefix} has more than {k} items: no free last-level code for item row {i}; "
                    "use quantizer.collisions=extra_level, more levels or a larger codebook"
                )
            out[i, -1] = code
            taken.add(prefix + (int(code),))
    return out


def extra_level(codes: np.ndarray) -> np.ndarray:
    """The `extra_level` fix (module docstring)."""
    rank = np.zeros(codes.shape[0], np.int32)
    for items in _groups(codes):
        rank[items] = np.arange(len(items))
    return np.concatenate([codes, rank[:, None]], axis=1)


def make_unique(codes: np.ndarray, last_distances: np.ndarray, fix: Fix) -> np.ndarray:
    """Unique codes by `fix`; raises if the result still collides (a bug, not bad input)."""
    out = reassign(codes, last_distances) if fix == "reassign" else extra_level(codes)
    if collision_stats(out)["distinct_sids"] != codes.shape[0]:
        raise AssertionError("collision fix left duplicate SIDs")
    return out
