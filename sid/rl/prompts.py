"""The RL stage's prompts: (prompt text, target SID) pairs from the prompt sets `rl.prompts` names.

Upstream's RL stage rolls out three sets shuffled together: the train split's SID histories, one title -> SID
question per catalog item (and one per item description, which sid's catalog does not read), and a sample of
10,000 train rows given as title histories. sid words each set as its SFT task does (`sid.data.tasks`), in the
frame the SFT model was trained with; docs/rl.md records upstream's RL wording, which differs from its own SFT's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sid.data.config import TasksConfig
from sid.data.minionerec import Catalog, Interaction
from sid.data.tasks import eval_prompts, title2sid_samples, title_history_sample
from sid.errors import ConfigError
from sid.rl.config import PROMPT_TASKS, RLConfig


def _needs_titles(name: str, catalog: Catalog) -> None:
    if not catalog.titles:
        raise ConfigError(
            f"rl.prompts: {name} needs item titles, but {catalog.index_path}'s dataset has none (LETTER ships no "
            "item.json); leave it out of rl.prompts"
        )


def _title_history(rows: Sequence[Interaction], rl: RLConfig, category_text: str, seed: int) -> list[tuple[str, str]]:
    """A seeded sample of at most rl.title_history_samples train rows (all when 0), in train order."""
    keep = np.arange(len(rows))
    if 0 < rl.title_history_samples < len(rows):
        keep = np.sort(np.random.default_rng([seed, 2]).choice(len(rows), rl.title_history_samples, replace=False))
    samples = [title_history_sample(rows[i], category_text) for i in keep]
    return [(s.prompt, s.completion.removesuffix("\n")) for s in samples]


def rl_prompts(
    rows: Sequence[Interaction], catalog: Catalog, tasks: TasksConfig, rl: RLConfig, category_text: str, seed: int
) -> dict[str, list[tuple[str, str]]]:
    """(prompt, target SID) pairs of every enabled prompt set, by set name in `PROMPT_TASKS` order (the rollout
    source shuffles them together each epoch)."""
    unknown = sorted(set(rl.prompts) - set(PROMPT_TASKS))
    if unknown or not rl.prompts:
        raise ConfigError(f"rl.prompts={list(rl.prompts)}: give one or more of {list(PROMPT_TASKS)}")
    out: dict[str, list[tuple[str, str]]] = {}
    if "next_sid" in rl.prompts:
        out["next_sid"] = eval_prompts(rows, tasks)
    if "title2sid" in rl.prompts:
        _needs_titles("title2sid", catalog)
        out["title2sid"] = [(s.prompt, s.completion.removesuffix("\n")) for s in title2sid_samples(catalog)]
    if "title_history" in rl.prompts:
        _needs_titles("title_history", catalog)
        out["title_history"] = _title_history(rows, rl, category_text, seed)
    return out
