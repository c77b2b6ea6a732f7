"""Held-out evaluations during training and what they decide: which step is the best so far (`train.select_by`)
and when to stop early (`train.early_stop_patience`). Pure bookkeeping; the trainer saves and restores it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

SELECT_KEYS = {"loss": "eval_loss", "ndcg@10": "valid/ndcg@10", "hr@10": "valid/hr@10"}
"""`train.select_by` -> the evaluation result it reads (the held-out loss keeps metrics.jsonl's `eval_loss` key)."""


class Evaluator(Protocol):
    """A held-out measurement of the model after `step`, run every `every` steps and after the last step."""

    every: int

    def __call__(self, model: Any, step: int) -> dict[str, float]: ...


def due(evaluators, step: int, total_steps: int) -> list:
    """The evaluators to run after `step`: those whose period divides it, all of them after the last step."""
    return [e for e in evaluators if e.every and (step % e.every == 0 or step == total_steps)]


@dataclass
class Selection:
    """The best evaluation so far by `metric` (a key of the evaluators' results; lower is better only for a loss),
    and how many evaluations in a row have not beaten it. A tie is no improvement: the earlier step stays best."""

    metric: str
    patience: int = 0
    best_step: int | None = None
    best_value: float | None = None
    best_results: dict[str, float] = field(default_factory=dict)
    stale: int = 0

    @property
    def lower_is_better(self) -> bool:
        return "loss" in self.metric

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best_value is None:
            return True
        return value < self.best_value if self.lower_is_better else value > self.best_value

    def update(self, step: int, results: dict[str, float]) -> bool:
        """Record one evaluation; True when it is the new best (the caller keeps that model)."""
        if self.metric not in results:
            return False
        if self.improves(results[self.metric]):
            self.best_step, self.best_value, self.best_results, self.stale = step, results[self.metric], results, 0
            return True
        self.stale += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale >= self.patience

    def state(self) -> dict[str, Any]:
        """JSON-able, saved with every checkpoint so that a resumed run keeps the best so far and its patience."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Selection:
        return cls(**state)

    def summary(self) -> dict[str, Any] | None:
        """run_summary.json's `train.best`, or None before any evaluation."""
        if self.best_step is None:
            return None
        return {"step": self.best_step, "metric": self.metric, "value": self.best_value, "valid": self.best_results}
