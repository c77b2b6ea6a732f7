"""EvalConfig: trie-constrained beam search and ranking metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sid.config import ConfigError


@dataclass(frozen=True)
class EvalConfig:
    """Generative-retrieval evaluation: beams over the SID trie, HR@K / NDCG@K."""

    enabled: bool = True
    """Evaluate (after training, for sid.train)."""
    split: Literal["valid", "test"] = "test"
    """Which split to rank."""
    num_beams: int = 50
    """Beams; may exceed the first-level codes (impossible beams score -inf)."""
    topk: tuple[int, ...] = (1, 3, 5, 10, 20, 50)
    """K values of HR@K and NDCG@K (each ≤ num_beams)."""
    per_device_batch_size: int = 8
    """Prompts per device per decode batch."""
    max_samples: int = 0
    """Evaluate only the first N samples (0: all)."""
    prompt_buckets: tuple[int, ...] = (128, 256, 512)
    """Prompt lengths padded to (left padding); each compiles once."""
    checkpoint: str = ""
    """sid.eval: run directory to evaluate (its exported model; if that is missing or damaged, its newest intact
    checkpoint), an HF directory, or one checkpoint step directory; empty: the config's own model."""
    predictions_file: str = "predictions.json"
    """Predictions in MiniOneRec calc.py schema, inside the run directory."""

    def __post_init__(self):
        for name in ("num_beams", "per_device_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_samples < 0:
            raise ConfigError(f"eval.max_samples must be >= 0 (0: all samples), got {self.max_samples}")
        if not self.topk or min(self.topk) < 1:
            raise ConfigError(f"eval.topk must be K values >= 1, got {self.topk}")
