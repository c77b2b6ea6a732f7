"""RQ-KMeans speed and quality: sid.index's JAX residual k-means against a NumPy Lloyd and scikit-learn's KMeans
running the same recipe (k-means++ seeding, the same number of Lloyd iterations per level) on the same synthetic
item embeddings. sid and scikit-learn seed with greedy k-means++ (2 + floor(ln k) candidates per pick), the NumPy
reference with plain k-means++ (sid's seeding with `candidates=1`, the tests' reference for it).

Per implementation: wall time of the whole 3-level fit (JAX: the first call, which compiles, and a second one),
and per level the k-means objective (sum of squared distances to the assigned code) and the relative residual
||x - reconstruction||^2 / ||x||^2. scikit-learn is a dev extra only: without it, its row is skipped.

    python bench/index_speed.py --out runs/bench/index_speed.json          # 10,000 items x 3 levels x 256 codes
    python bench/index_speed.py --tiny --out /tmp/index_speed_tiny.json    # CPU smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from common import host_environment, jax_environment, markdown_table, write_json


def mixture(n: int, dim: int, centers: int, seed: int) -> np.ndarray:
    """`n` float32 points around `centers` Gaussian centers (unit spread between centers, 0.3 within)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, dim))
    return (means[rng.integers(0, centers, n)] + 0.3 * rng.standard_normal((n, dim))).astype(np.float32)


def numpy_kmeans(x: np.ndarray, k: int, iters: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k-means++ seeding then `iters` Lloyd steps in NumPy (in x's dtype); an empty code keeps its centroid."""
    n = x.shape[0]
    centroids = np.empty((k, x.shape[1]), x.dtype)
    centroids[0] = x[rng.integers(n)]
    nearest = ((x - centroids[0]) ** 2).sum(axis=1)
    for i in range(1, k):
        p = nearest / nearest.sum() if nearest.sum() > 0 else np.full(n, 1.0 / n)
        centroids[i] = x[rng.choice(n, p=p)]
        nearest = np.minimum(nearest, ((x - centroids[i]) ** 2).sum(axis=1))
    sq = (x * x).sum(axis=1)[:, None]
    for step in range(iters + 1):
        codes = np.argmin(sq - 2.0 * x @ centroids.T + (centroids * centroids).sum(axis=1)[None, :], axis=1)
        if step == iters:
            break
        counts = np.bincount(codes, minlength=k)
        sums = np.zeros_like(centroids)
        np.add.at(sums, codes, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, codes


def residual_fit(
    x: np.ndarray, levels: int, fit: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(codebook, codes) per level: `fit` (one level's k-means) on the residual, then its centers subtracted."""
    residual, out = x.copy(), []
    for _ in range(levels):
        book, codes = fit(residual)
        out.append((book, codes))
        residual = residual - book[codes]
    return out


def numpy_rq_kmeans(x: np.ndarray, levels: int, k: int, iters: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(codebook, codes) per level of residual k-means in NumPy."""
    rng = np.random.default_rng(seed)
    return residual_fit(x, levels, lambda residual: numpy_kmeans(residual, k, iters, rng))


def sklearn_rq_kmeans(
    x: np.ndarray, levels: int, k: int, iters: int, seed: int, n_iter: list[int]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(codebook, codes) per level of residual k-means with scikit-learn's KMeans: its (greedy) k-means++ seeding,
    then at most `iters` Lloyd steps; with tol=0 it stops early only once no assignment changes. Appends each
    level's Lloyd step count to `n_iter`."""
    from sklearn.cluster import KMeans

    def fit(residual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        km = KMeans(
            n_clusters=k, init="k-means++", n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd", random_state=seed
        )
        km.fit(residual)
        n_iter.append(int(km.n_iter_))
        return km.cluster_centers_, km.labels_

    return residual_fit(x, levels, fit)


def level_quality(x: np.ndarray, books_codes: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, float]]:
    """Per level: the k-means objective on that level's input and the relative residual after it."""
    residual, total, rows = x.astype(np.float64), float((x.astype(np.float64) ** 2).sum()), []
    for book, codes in books_codes:
        after = residual - book[codes]
        rows.append({"objective": float((after**2).sum()), "relative_residual": float((after**2).sum() / total)})
        residual = after
    return rows


def timed(name: str, x: np.ndarray, fit: Callable[[], list[tuple[np.ndarray, np.ndarray]]]) -> dict[str, Any]:
    """One row: `fit`'s wall time and the per-level quality of what it returns."""
    start = time.perf_counter()
    result = fit()
    return {"implementation": name, "seconds": time.perf_counter() - start, "levels": level_quality(x, result)}


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    import jax

    from sid.index.residual import residual_kmeans

    x = mixture(args.items, args.dim, args.centers, args.seed)

    def sid_fit():
        books, codes, _ = residual_kmeans(
            x, args.levels, args.codes, iters=args.iters, balanced=args.balanced, key=jax.random.key(args.seed)
        )
        codes = np.asarray(jax.block_until_ready(codes))
        return [(np.asarray(b), codes[:, i]) for i, b in enumerate(books)]

    rows = [timed("sid (JAX), first call", x, sid_fit), timed("sid (JAX), second call", x, sid_fit)]
    rows.append(timed("NumPy Lloyd", x, lambda: numpy_rq_kmeans(x, args.levels, args.codes, args.iters, args.seed)))
    return rows + sklearn_rows(x, args)


def sklearn_rows(x: np.ndarray, args: argparse.Namespace) -> list[dict[str, Any]]:
    """scikit-learn's row with its Lloyd step count per level, or no row (and a note) when it is not installed."""
    try:
        import sklearn.cluster  # noqa: F401  (imported before the clock starts)
    except ImportError:
        print("scikit-learn is not installed (a dev extra): skipping the scikit-learn KMeans row", file=sys.stderr)
        return []
    n_iter: list[int] = []
    row = timed(
        "scikit-learn KMeans", x, lambda: sklearn_rq_kmeans(x, args.levels, args.codes, args.iters, args.seed, n_iter)
    )
    return [row | {"lloyd_iterations": n_iter}]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/bench/index_speed.json", help="JSON results path")
    p.add_argument("--items", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=64, help="embedding width (sid.index's collaborative default)")
    p.add_argument("--centers", type=int, default=1000, help="Gaussian centers of the synthetic embeddings")
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codes", type=int, default=256, help="codes per level")
    p.add_argument("--iters", type=int, default=50, help="Lloyd iterations per level (sid.index's default)")
    p.add_argument(
        "--balanced", action="store_true", help="sid's balanced assignment (NumPy and scikit-learn stay unbalanced)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: 500 items x 2 levels x 16 codes, 10 iterations")
    args = p.parse_args(argv)
    if args.tiny:
        args.items, args.dim, args.centers, args.levels, args.codes, args.iters = 500, 8, 20, 2, 16, 10
    rows = measure(args)
    write_json(
        args.out,
        {"benchmark": "index_speed", "args": vars(args), **host_environment(), **jax_environment(), "results": rows},
    )
    table = [
        {"implementation": r["implementation"], "seconds": round(r["seconds"], 2)}
        | {f"L{i + 1} rel. residual": round(lv["relative_residual"], 4) for i, lv in enumerate(r["levels"])}
        for r in rows
    ]
    print(markdown_table(table, {k: k for k in table[0]}))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
