"""Ranking metrics of generative retrieval, counted exactly as MiniOneRec's calc.py counts them.

Each sample has one target SID and a ranked list of predicted SID strings. The rank is the 0-based index of the
first prediction that equals the target string; HR@K counts rank < K and NDCG@K adds 1/log2(rank + 2) (one relevant
item, so the ideal DCG is 1). Matching is by SID string, so when several items share a SID, predicting that SID is a
hit for each of them, as upstream counts it. A prediction that is no catalog SID is an invalid prediction (upstream's
"unknown items"); it must never happen under trie constraints, and it is counted over every prediction, not only
those ranked above a hit as calc.py's early exit does.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np


def first_hit_ranks(predictions: Sequence[Sequence[str]], targets: Sequence[str]) -> np.ndarray:
    """int64 [samples]: the index of the first prediction equal to the target, -1 when none is."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} prediction lists for {len(targets)} targets")
    ranks = np.full(len(targets), -1, dtype=np.int64)
    for i, (predict, target) in enumerate(zip(predictions, targets, strict=True)):
        for rank, sid in enumerate(predict):
            if sid == target:
                ranks[i] = rank
                break
    return ranks


@dataclass(frozen=True)
class RankingMetrics:
    """HR@K and NDCG@K over a split, plus the sanity counts that go into run_summary.json."""

    hr: dict[int, float]
    """K -> fraction of samples whose target is among the first K predictions."""
    ndcg: dict[int, float]
    """K -> mean of 1/log2(rank + 2) over samples with rank < K (0 for the others)."""
    n_samples: int
    """Samples ranked."""
    invalid_prediction_count: int
    """Predictions that are not catalog SIDs (0 under trie constraints)."""

    def to_dict(self) -> dict:
        """JSON-ready: ``{"hr": {"1": ...}, "ndcg": {...}, "topk": [...], "n_samples", "invalid_prediction_count"}``."""
        return {
            "hr": {str(k): v for k, v in self.hr.items()},
            "ndcg": {str(k): v for k, v in self.ndcg.items()},
            "topk": list(self.hr),
            "n_samples": self.n_samples,
            "invalid_prediction_count": self.invalid_prediction_count,
        }

    def flat(self, prefix: str = "eval/") -> dict[str, float]:
        """Scalars for a metrics logger: ``{prefix}HR@K``, ``{prefix}NDCG@K``, ``{prefix}invalid_prediction_count``."""
        out = {f"{prefix}HR@{k}": v for k, v in self.hr.items()}
        out.update({f"{prefix}NDCG@{k}": v for k, v in self.ndcg.items()})
        out[f"{prefix}invalid_prediction_count"] = float(self.invalid_prediction_count)
        return out

    def table(self) -> str:
        """A printable table, one row per K."""
        lines = [f"{'K':>4}  {'HR@K':>8}  {'NDCG@K':>8}"]
        lines += [f"{k:>4}  {self.hr[k]:>8.4f}  {self.ndcg[k]:>8.4f}" for k in self.hr]
        lines.append(f"n_samples={self.n_samples}  invalid_prediction_count={self.invalid_prediction_count}")
        return "\n".join(lines)


def ranking_metrics(
    predictions: Sequence[Sequence[str]], targets: Sequence[str], topk: Sequence[int], catalog_sids: Collection[str]
) -> RankingMetrics:
    """HR@K and NDCG@K for every K in ``topk``, and the count of predictions outside ``catalog_sids``.

    Raises ValueError for no samples, mismatched lengths, a K < 1, or a K larger than the longest prediction list
    (upstream silently skips such K; here it is a configuration error).
    """
    if not targets:
        raise ValueError("no samples to rank")
    ks = tuple(int(k) for k in topk)
    longest = max((len(p) for p in predictions), default=0)
    bad = [k for k in ks if not 1 <= k <= longest]
    if bad:
        raise ValueError(f"top-K values {bad} must be in [1, {longest}] (the most predictions any sample has)")
    ranks = first_hit_ranks(predictions, targets)
    within = {k: (ranks >= 0) & (ranks < k) for k in ks}
    gain = 1.0 / np.log2(np.maximum(ranks, 0) + 2.0)
    catalog = catalog_sids if isinstance(catalog_sids, set | frozenset | dict) else set(catalog_sids)
    return RankingMetrics(
        hr={k: float(np.mean(within[k])) for k in ks},
        ndcg={k: float(np.mean(np.where(within[k], gain, 0.0))) for k in ks},
        n_samples=len(targets),
        invalid_prediction_count=sum(sid not in catalog for predict in predictions for sid in predict),
    )
