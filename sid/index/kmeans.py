"""K-means in JAX: greedy k-means++ seeding, Lloyd iterations, and a balanced (capacity-bounded) assignment.

All of it is jitted; shapes are static (points [n, d], k codes), so one compile serves every level of a residual
quantizer. Distances and centroid means are f32 whatever the input dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray


def sq_distances(x: Float[Array, "n d"], c: Float[Array, "k d"]) -> Float[Array, "n k"]:
    """Squared Euclidean distances, clipped at 0 (the expanded form can round below it)."""
    d = jnp.sum(x * x, axis=1)[:, None] - 2.0 * x @ c.T + jnp.sum(c * c, axis=1)[None, :]
    return jnp.maximum(d, 0.0)


def greedy_candidates(k: int) -> int:
    """Candidates per pick of greedy k-means++ for `k` codes: 2 + floor(ln k), the count Arthur & Vassilvitskii
    (2007) mention trying and scikit-learn's KMeans uses (7 for 256 codes)."""
    return 2 + int(math.log(k))


@functools.partial(jax.jit, static_argnames=("k", "candidates"))
def kmeans_pp(x: Float[Array, "n d"], k: int, key: PRNGKeyArray, candidates: int | None = None) -> Float[Array, "k d"]:
    """Greedy k-means++ seeding. The first centroid is a uniform draw; for each next one, `candidates` points are
    drawn with probability proportional to their squared distance to the nearest centroid so far, and the one that
    leaves the smallest potential (the sum of those distances once it is added) is kept. None: `greedy_candidates(k)`;
    1: plain k-means++ (Arthur & Vassilvitskii 2007), the same draws for a key as sid's seeding before greedy.
    """
    candidates = greedy_candidates(k) if candidates is None else candidates
    if candidates < 1:
        raise ValueError(f"k-means++ needs at least 1 candidate per pick, got {candidates}")
    n = x.shape[0]
    first_key, loop_key = jax.random.split(key)
    first = x[jax.random.randint(first_key, (), 0, n)]
    centroids = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
    nearest = jnp.sum((x - first) ** 2, axis=1)

    def pick(i, state):
        centroids, nearest = state
        # All points equal to some centroid (fewer distinct points than k): draw uniformly.
        p = jnp.where(nearest.sum() > 0, nearest, 1.0)
        idx = jax.random.choice(jax.random.fold_in(loop_key, i), n, (candidates,), p=p / p.sum())
        # Every point's nearest distance with each candidate added: [candidates, n]. XLA fuses the difference
        # into the sum (no [candidates, n, d] buffer); it is the expression plain seeding always used, so with one
        # candidate the values, and so the draws, are the old ones by construction, not by luck of rounding.
        after = jnp.minimum(nearest[None, :], jnp.sum((x[None, :, :] - x[idx][:, None, :]) ** 2, axis=2))
        best = jnp.argmin(after.sum(axis=1))
        return centroids.at[i].set(x[idx[best]]), after[best]

    centroids, _ = jax.lax.fori_loop(1, k, pick, (centroids, nearest))
    return centroids


def balanced_assign(dist: Float[Array, "n k"], capacity: int, shortlist: int = 16) -> Int[Array, " n"]:
    """Assign each point to a code so that no code gets more than `capacity` points (needs n <= k * capacity).

    Rounds of proposals: every unassigned point proposes to its nearest code that still has room; each code
    accepts its closest proposers up to the room it has left. Each round accepts at least one point, so it ends;
    with ample capacity it is the plain nearest-code assignment. A point looks for its nearest open code among its
    `shortlist` nearest codes first and scans all codes only when those are full, which gives the same proposal
    at a fraction of the cost per round.
    """
    n, k = dist.shape
    if n > k * capacity:
        raise ValueError(f"{n} points do not fit {k} codes of capacity {capacity}")
    dist, rows = jnp.asarray(dist), jnp.arange(n)
    _, near = jax.lax.top_k(-dist, min(shortlist, k))  # [n, shortlist], nearest first

    def nearest_open(free, room):
        is_open = room[near] > 0
        listed = near[rows, jnp.argmax(is_open, axis=1)]
        found = is_open.any(axis=1)

        def scan_all():
            return jnp.where(found, listed, jnp.argmin(jnp.where(room[None, :] > 0, dist, jnp.inf), axis=1))

        return jax.lax.cond(jnp.any(free & ~found), scan_all, lambda: listed)

    def round_(state):
        assign, room = state
        free = assign < 0
        code = nearest_open(free, room)
        d = jnp.where(free, dist[rows, code], jnp.inf)
        order = jnp.lexsort((d, code))  # by code, then by distance: assigned points (inf) sort last
        per_code = jnp.bincount(code, length=k)
        first = jnp.cumsum(per_code) - per_code  # where each code's run starts in `order`
        rank = jnp.zeros(n, jnp.int32).at[order].set((rows - first[code[order]]).astype(jnp.int32))
        accept = free & (rank < room[code])
        room = room - jnp.bincount(code, weights=accept.astype(jnp.int32), length=k).astype(room.dtype)
        return jnp.where(accept, code, assign), room

    init = (jnp.full(n, -1, jnp.int32), jnp.full(k, capacity, jnp.int32))
    assign, _ = jax.lax.while_loop(lambda s: jnp.any(s[0] < 0), round_, init)
    return assign


def assign(x: Float[Array, "n d"], c: Float[Array, "k d"], capacity: int | None) -> Int[Array, " n"]:
    """Nearest-code assignment, or the balanced one when `capacity` is set."""
    dist = sq_distances(x, c)
    if capacity is None:
        return jnp.argmin(dist, axis=1).astype(jnp.int32)
    return balanced_assign(dist, capacity)


@functools.partial(jax.jit, static_argnames=("k", "iters", "capacity", "candidates"))
def kmeans(
    x: Float[Array, "n d"],
    k: int,
    key: PRNGKeyArray,
    iters: int = 50,
    capacity: int | None = None,
    candidates: int | None = None,
) -> tuple[Float[Array, "k d"], Int[Array, " n"]]:
    """Greedy k-means++ seeding (`candidates` candidates per pick, see `kmeans_pp`) then `iters` Lloyd steps; returns
    (centroids, assignment).

    A code left empty keeps its previous centroid. With `capacity`, every assignment step is the balanced one.
    """
    x = x.astype(jnp.float32)
    centroids = kmeans_pp(x, k, key, candidates)

    def lloyd(_, centroids):
        codes = assign(x, centroids, capacity)
        onehot = jax.nn.one_hot(codes, k, dtype=jnp.float32)
        counts = onehot.sum(axis=0)
        sums = onehot.T @ x
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)

    centroids = jax.lax.fori_loop(0, iters, lloyd, centroids)
    return centroids, assign(x, centroids, capacity)


def objective(x: Float[Array, "n d"], c: Float[Array, "k d"], codes: Int[Array, " n"]) -> Float[Array, ""]:
    """Sum of squared distances of each point to its assigned centroid."""
    return jnp.sum((x - c[codes]) ** 2)
