"""Item embeddings, one row per item in ascending item-id order, from one of three sources:

- collaborative: a truncated SVD of the positive PMI matrix of item co-occurrences in the training interactions
  (each target with the history items just before it); needs no pretrained weights;
- text: mean-pooled final hidden states of a local HF Qwen2 directory over each item's title and description,
  through sid's own Qwen2 (jitted, batched);
- npy: a user's `[items, dim]` array whose row i belongs to the i-th item id in ascending order.

Every source's output goes through `check_embeddings`: one row per item, finite values, the expected width.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from sid.data.errors import DataError
from sid.data.minionerec import Interaction

logger = logging.getLogger(__name__)


class EmbeddingError(DataError):
    """Embeddings that do not fit the items: a missing row, a non-finite value, the wrong width."""

    reason = "bad_embedding"


def check_embeddings(emb: np.ndarray, item_ids: Sequence[int], path: str | Path, dim: int | None = None) -> np.ndarray:
    """`emb` as float32 if it has one finite row of width `dim` (when given) per item, else EmbeddingError naming
    `path` and the first offending item."""
    if not item_ids:
        raise EmbeddingError(path, None, None, "there are no items to embed")
    if emb.ndim != 2:
        raise EmbeddingError(path, None, None, f"expected a 2-D [items, dim] array, got shape {emb.shape}")
    if emb.shape[0] < len(item_ids):
        raise EmbeddingError(
            path, None, f"item {item_ids[emb.shape[0]]}", f"{emb.shape[0]} rows for {len(item_ids)} items: no row"
        )
    if emb.shape[0] > len(item_ids):
        raise EmbeddingError(path, None, None, f"{emb.shape[0]} rows for {len(item_ids)} items: rows without items")
    if dim is not None and emb.shape[1] != dim:
        raise EmbeddingError(path, None, None, f"rows have {emb.shape[1]} values, expected {dim} (embed.expected_dim)")
    bad = np.flatnonzero(~np.isfinite(emb).all(axis=1))
    if bad.size:
        raise EmbeddingError(
            path, None, f"item {item_ids[bad[0]]}", f"non-finite values (row {bad[0]}; {bad.size} rows)"
        )
    return emb.astype(np.float32)


def load_npy(path: str | Path, item_ids: Sequence[int], dim: int | None = None) -> np.ndarray:
    """A user's `.npy` embeddings, checked against the items."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding file {path} not found (embed.npy_path)")
    return check_embeddings(np.load(path, allow_pickle=False), item_ids, path, dim)


def cooccurrence(
    interactions: Sequence[Interaction], item_ids: Sequence[int], window: int, path: str | Path
) -> sp.csr_matrix:
    """Symmetric count matrix: each interaction's target co-occurs with its last `window` history items."""
    row_of = {item: i for i, item in enumerate(item_ids)}
    rows, cols = [], []
    for it in interactions:
        for item in (*it.history_ids[-window:], it.target_id):
            if item not in row_of:
                raise EmbeddingError(path, None, f"item {item}", "interaction item is not in the catalog")
        t = row_of[it.target_id]
        for h in it.history_ids[-window:]:
            if row_of[h] != t:
                rows += [t, row_of[h]]
                cols += [row_of[h], t]
    n = len(item_ids)
    counts = sp.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n)).tocsr()
    counts.sum_duplicates()
    return counts


def ppmi(counts: sp.csr_matrix) -> sp.csr_matrix:
    """Positive pointwise mutual information of a symmetric count matrix: max(0, log(c_ij * N / (c_i * c_j)))."""
    coo = counts.tocoo()
    marg = np.asarray(counts.sum(axis=1)).ravel()
    pmi = np.log(coo.data * counts.sum() / (marg[coo.row] * marg[coo.col]))
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=counts.shape)


def truncated_svd(a: sp.spmatrix, dim: int, seed: int, power_iters: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Top-`dim` left singular vectors and values of `a` by randomized range finding (Halko et al. 2011),
    in float64 with a seeded Gaussian sketch, so the same input gives the same output."""
    rank = min(dim + 10, min(a.shape))
    q, _ = np.linalg.qr(a @ np.random.default_rng(seed).standard_normal((a.shape[1], rank)))
    for _ in range(power_iters):
        q, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ q)
    u, s, _ = np.linalg.svd((a.T @ q).T, full_matrices=False)
    return (q @ u)[:, :dim], s[:dim]


def collaborative(
    interactions: Sequence[Interaction], item_ids: Sequence[int], dim: int, window: int, seed: int, path: str | Path
) -> np.ndarray:
    """Item vectors U * sqrt(S) of the PPMI co-occurrence matrix, each row scaled to unit length.

    Items that never co-occur with another (cold: no signal) get seeded random unit vectors instead of zeros, so
    they spread over the codes rather than all sharing one SID.
    """
    if dim > len(item_ids):
        raise EmbeddingError(path, None, None, f"embed.dim={dim} exceeds the {len(item_ids)} items")
    counts = cooccurrence(interactions, item_ids, window, path)
    if counts.nnz == 0:
        raise EmbeddingError(path, None, None, "no two items co-occur in the training interactions")
    u, s = truncated_svd(ppmi(counts), dim, seed)
    vectors = u * np.sqrt(s)[None, :]
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    cold = norms[:, 0] == 0
    if cold.any():
        logger.warning("%d of %d items never co-occur with another: random vectors", cold.sum(), len(item_ids))
        noise = np.random.default_rng(seed + 1).standard_normal((int(cold.sum()), dim))
        vectors[cold], norms[cold] = noise, np.linalg.norm(noise, axis=1, keepdims=True)
    return vectors / norms
