"""RLConfig: the GRPO stage's own settings (where the policy starts, rollouts, reward, loss, reference model)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RLConfig:
    """GRPO after SFT (MiniOneRec's recipe; docs/rl.md). One optimizer step = one rollout of `prompts_per_step`
    train prompts x `group_size` completions, i.e. prompts_per_step x group_size rows."""

    init: str = ""
    """Where the policy starts: an SFT run directory (its `model/` HF export, the best model when that run selected
    one) or an HF directory. Relative paths are from the working directory."""
    group_size: int = 16
    """Completions per prompt (G): beams, or samples."""
    rollout: Literal["beam", "sample"] = "beam"
    """Constrained beam search (group = the G best beams, ranked) or constrained sampling with `temperature`."""
    temperature: float = 1.0
    """Sampling temperature (rollout: sample only)."""
    reward: str = "ranking"
    """Reward function by name (sid.rl.rewards.REWARDS): ranking, rule, ranking_only."""
    loss: Literal["grpo", "token_mean", "sequence"] = "grpo"
    """Reduction: per completion then over completions (grpo), over all tokens (token_mean, DAPO), or a sequence
    ratio (sequence, GSPO)."""
    beta: float = 1e-3
    """Weight of the k3 KL penalty against the reference model."""
    prompts_per_step: int = 64
    """Train prompts rolled out per optimizer step (must divide over the mesh's data axes)."""
    ref_sync_every: int = 0
    """Copy the policy into the reference model every N steps (0: the reference stays the starting model)."""
