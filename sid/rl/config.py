"""RLConfig: the GRPO stage's own settings (where the policy starts, prompts, rollouts, reward, loss, reference)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PROMPT_TASKS = ("next_sid", "title2sid", "description2sid", "title_history")
"""RL prompt sets (`RLConfig.prompts`), each with a catalog SID as its target (`sid.rl.prompts`)."""


@dataclass(frozen=True)
class RLConfig:
    """GRPO after SFT (MiniOneRec's recipe; docs/rl.md). One optimizer step = one rollout of `prompts_per_step`
    train prompts with `group_size` completions each."""

    init: str = ""
    """Where the policy starts: an SFT run directory (its `model/` HF export, the best model when that run selected
    one) or an HF directory. Relative paths are from the working directory."""
    prompts: tuple[str, ...] = ("next_sid",)
    """Prompt sets rolled out (shuffled together): next_sid (the train split's SID histories), title2sid and
    description2sid (one per distinct title / description of the catalog), title_history (train rows with title
    histories). Upstream uses all four."""
    title_history_samples: int = 10000
    """At most this many title_history prompts, a seeded sample of the train rows (upstream: 10,000; 0 = all)."""
    group_size: int = 16
    """Completions per prompt (G): beams, or samples."""
    rollout: Literal["beam", "sample"] = "beam"
    """Constrained beam search (group = the G best beams, ranked) or constrained sampling with `temperature`."""
    temperature: float = 1.0
    """Sampling temperature (rollout: sample only)."""
    dynamic_sampling: bool = False
    """rollout: sample only. Draw int(1.5 G) samples and keep G: the target's copies first, then the other SIDs
    by how often they were drawn, one of each per round (upstream's dynamic sampling)."""
    add_gt: bool = False
    """Replace the last completion of every group with the target SID (upstream's add_gt)."""
    reward: str = "ranking"
    """Reward function by name (sid.rl.rewards.REWARDS): ranking, rule, ranking_only."""
    loss: Literal["grpo", "token_mean", "sequence"] = "grpo"
    """Reduction: per completion then over completions (grpo), over all tokens (token_mean, DAPO), or a sequence
    ratio (sequence, GSPO)."""
    beta: float = 1e-3
    """Weight of the k3 KL penalty against the reference model."""
    prompts_per_step: int = 64
    """Train prompts rolled out per optimizer step (must divide over the mesh's data axes)."""
    rollout_chunks: int = 1
    """Roll a step's prompts out in this many equal chunks, sorted by length, each left-padded to the smallest of
    eval.prompt_buckets that holds its longest prompt (1: the whole step in one bucket). Prompts of very different
    lengths (Industrial's four sets) then run fewer padding tokens; each chunk size and bucket compiles the rollout
    once. prompts_per_step must be a multiple of the chunks x the mesh's data shards."""
    pack: bool = True
    """Pack several prompts, each with its completions, into a row where they fit (rows as wide as the longest
    prompt bucket with its completions), so the reference pass and the update run little padding; the same
    log-probs as one prompt per row (False), up to float rounding."""
    ref_sync_every: int = 0
    """Update the reference model every N steps (0: the reference stays the starting model)."""
    ref_sync_alpha: float = 1.0
    """At a sync, reference <- alpha * policy + (1 - alpha) * reference (1: a copy of the policy; TRL's
    SyncRefModelCallback mixes with its own default of 0.6). Each synced reference is saved in RUN_DIR/reference
    for an exact resume."""
