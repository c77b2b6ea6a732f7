"""Residual k-means (RQ-KMeans): level l clusters what levels < l left unexplained.

The result of every quantizer is a :class:`Quantized`: the codes, what a set of codes reconstructs, and each
item's distances to the last level's codebook (the collision fix moves items along those).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from sid.index.kmeans import kmeans, sq_distances


@dataclass(frozen=True)
class Quantized:
    """Codes of every item and what they mean."""

    codes: np.ndarray
    """[items, levels] int32, each in [0, codebook_size)."""
    last_distances: np.ndarray
    """[items, codebook_size]: squared distance of each item's last residual to each last-level code."""
    reconstruct: Callable[[np.ndarray], np.ndarray]
    """codes [items, levels] -> reconstructed embeddings [items, dim]."""


def capacity(n: int, k: int, balanced: bool) -> int | None:
    """Room per code for an even spread of `n` points over `k` codes, or None (unbounded) when not balanced."""
    return math.ceil(n / k) if balanced else None


def residual_kmeans(
    x: np.ndarray, levels: int, k: int, *, iters: int, balanced: bool, key: jax.Array, candidates: int | None = None
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    """Per-level codebooks [k, d], codes [n, levels] and the residual left before the last level; `candidates` per
    k-means++ pick (None: greedy k-means++'s default, 1: plain k-means++)."""
    residual = jnp.asarray(x, jnp.float32)
    books, codes, before_last = [], [], residual
    for level_key in jax.random.split(key, levels):
        before_last = residual
        room = capacity(x.shape[0], k, balanced)
        book, code = kmeans(residual, k, level_key, iters=iters, capacity=room, candidates=candidates)
        books.append(book)
        codes.append(code)
        residual = residual - book[code]
    return books, jnp.stack(codes, axis=1), before_last


def rq_kmeans(
    x: np.ndarray, levels: int, k: int, *, iters: int, balanced: bool, seed: int, candidates: int | None = None
) -> Quantized:
    """RQ-KMeans of `x` [items, dim]: `levels` codebooks of `k` codes each."""
    key = jax.random.key(seed)
    books, codes, before_last = residual_kmeans(
        x, levels, k, iters=iters, balanced=balanced, key=key, candidates=candidates
    )
    stacked = np.stack([np.asarray(b) for b in books])  # [levels, k, d]

    def reconstruct(c: np.ndarray) -> np.ndarray:
        return stacked[np.arange(levels)[None, :], c[:, :levels]].sum(axis=1)

    return Quantized(
        codes=np.asarray(codes, np.int32),
        last_distances=np.asarray(sq_distances(before_last, books[-1])),
        reconstruct=reconstruct,
    )
