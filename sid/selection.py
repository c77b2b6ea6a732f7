"""Held-out evaluations during training and what they decide: which step is the best so far (`train.select_by`)
and when to stop early (`train.early_stop_patience`). Pure bookkeeping; the trainer saves and restores it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from sid.errors import ConfigError

if TYPE_CHECKING:
    from sid.config import TrainConfig
    from sid.eval.config import EvalConfig

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


def check_selection(cfg: TrainConfig, eval_cfg: EvalConfig | None) -> None:
    """Refuse, before anything runs, a selection that no evaluation would ever feed (`eval_cfg` None: a job that
    ranks nothing, such as nanoGPT's)."""
    if eval_cfg is None and (cfg.valid_rank_every or cfg.select_by in ("ndcg@10", "hr@10")):
        raise ConfigError("this job ranks nothing: train.valid_rank_every and train.select_by ndcg@10/hr@10 need SIDs")
    needs = {"loss": ("eval_loss_every", cfg.eval_loss_every), "ndcg@10": ("valid_rank_every", cfg.valid_rank_every)}
    needs["hr@10"] = needs["ndcg@10"]
    if cfg.select_by != "none" and not needs[cfg.select_by][1]:
        raise ConfigError(f"train.select_by={cfg.select_by} needs train.{needs[cfg.select_by][0]} > 0")
    if cfg.select_by in ("ndcg@10", "hr@10") and 10 not in eval_cfg.topk:
        raise ConfigError(f"train.select_by={cfg.select_by} needs 10 in eval.topk {eval_cfg.topk}")
    if cfg.early_stop_patience and cfg.select_by == "none":
        raise ConfigError("train.early_stop_patience needs train.select_by")
    for name in ("valid_rank_every", "valid_rank_samples", "early_stop_patience", "eval_loss_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"train.{name}={getattr(cfg, name)} must be >= 0")
