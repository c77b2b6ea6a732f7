"""RQ-KMeans speed and quality: sid.index's JAX residual k-means against a NumPy Lloyd of the same recipe
(k-means++ seeding, the same number of Lloyd iterations per level) on the same synthetic item embeddings.

Per implementation: wall time of the whole 3-level fit (JAX: the first call, which compiles, and a second one),
and per level the k-means objective (sum of squared distances to the assigned code) and the relative residual
||x - reconstruction||^2 / ||x||^2. scikit-learn is not a dependency of this project, so the reference is NumPy.

    python bench/index_speed.py --out runs/bench/index_speed.json          # 10,000 items x 3 levels x 256 codes
    python bench/index_speed.py --tiny --out /tmp/index_speed_tiny.json    # CPU smoke
"""

from __future__ import annotations

import argparse
import sys
import time
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


def numpy_rq_kmeans(x: np.ndarray, levels: int, k: int, iters: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(codebook, codes) per level of residual k-means in NumPy."""
    rng = np.random.default_rng(seed)
    residual, out = x.copy(), []
    for _ in range(levels):
        book, codes = numpy_kmeans(residual, k, iters, rng)
        out.append((book, codes))
        residual = residual - book[codes]
    return out


def level_quality(x: np.ndarray, books_codes: list[tuple[np.ndarray, np.ndarray]]) -> list[dict[str, float]]:
    """Per level: the k-means objective on that level's input and the relative residual after it."""
    residual, total, rows = x.astype(np.float64), float((x.astype(np.float64) ** 2).sum()), []
    for book, codes in books_codes:
        after = residual - book[codes]
        rows.append({"objective": float((after**2).sum()), "relative_residual": float((after**2).sum() / total)})
        residual = after
    return rows


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

    rows = []
    for name, fit in (("sid (JAX), first call", sid_fit), ("sid (JAX), second call", sid_fit)):
        start = time.perf_counter()
        result = fit()
        rows.append(
            {"implementation": name, "seconds": time.perf_counter() - start, "levels": level_quality(x, result)}
        )
    start = time.perf_counter()
    result = numpy_rq_kmeans(x, args.levels, args.codes, args.iters, args.seed)
    rows.append(
        {"implementation": "NumPy Lloyd", "seconds": time.perf_counter() - start, "levels": level_quality(x, result)}
    )
    return rows


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
    p.add_argument("--balanced", action="store_true", help="sid's balanced assignment (NumPy stays unbalanced)")
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
