"""The RL stage's prompts: (prompt text, target SID) pairs from the prompt sets `rl.prompts` names.

Upstream's RL stage rolls out its train split's SID histories, one title -> SID and one description -> SID question
per catalog item, and a sample of 10,000 train rows given as title histories. sid words each set as its SFT task
does (`sid.data.tasks`; description -> SID, which sid's SFT does not train, in the title -> SID frame) in the frame
the SFT model was trained with; docs/rl.md records upstream's RL wording, which differs from its own SFT's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from sid.data.config import TasksConfig
from sid.data.minionerec import Catalog, Interaction
from sid.data.tasks import ALIGNMENT_INSTRUCTION, TITLE2SID_QUESTION, eval_prompts, frame, title_history_sample
from sid.errors import ConfigError
from sid.rl.config import PROMPT_TASKS, RLConfig

log = logging.getLogger(__name__)


def _needs(name: str, what: str, have: dict, catalog: Catalog) -> None:
    if not have:
        raise ConfigError(
            f"rl.prompts: {name} needs item {what}, but {catalog.index_path}'s dataset has none (LETTER ships no "
            "item.json); leave it out of rl.prompts"
        )


def one_answer(name: str, pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """One pair per distinct prompt, in first-seen order. A prompt asked of items with different SIDs (two items
    with the same title or description) has no one right answer, so it is left out."""
    sids: dict[str, set[str]] = {}
    for prompt, sid in pairs:
        sids.setdefault(prompt, set()).add(sid)
    kept = [(prompt, next(iter(s))) for prompt, s in sids.items() if len(s) == 1]
    if len(kept) < len(sids):
        log.info("rl.prompts: %s leaves out %d prompts that name items of different SIDs", name, len(sids) - len(kept))
    return kept


def description2sid(catalog: Catalog) -> list[tuple[str, str]]:
    """(prompt, SID) for every item with a description, in item id order, in upstream's RL question."""
    question = 'An item can be described as follows: "{}". Which item is it describing?'
    return [
        (frame(ALIGNMENT_INSTRUCTION, question.format(d)), catalog.sids[i])
        for i, d in sorted(catalog.descriptions.items())
    ]


def title2sid(catalog: Catalog) -> list[tuple[str, str]]:
    """(prompt, SID) for every titled item, in item id order, in the SFT task's question (SFT's own samples keep
    one item per title, upstream's way, which would hide the titles `one_answer` must leave out)."""
    titled = sorted(i for i in catalog.sids if i in catalog.titles)
    prompts = [frame(ALIGNMENT_INSTRUCTION, TITLE2SID_QUESTION.format(catalog.titles[i])) for i in titled]
    return list(zip(prompts, [catalog.sids[i] for i in titled], strict=True))


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
        _needs("title2sid", "titles", catalog.titles, catalog)
        out["title2sid"] = one_answer("title2sid", title2sid(catalog))
    if "description2sid" in rl.prompts:
        _needs("description2sid", "descriptions", catalog.descriptions, catalog)
        out["description2sid"] = one_answer("description2sid", description2sid(catalog))
    if "title_history" in rl.prompts:
        _needs("title_history", "titles", catalog.titles, catalog)
        out["title_history"] = _title_history(rows, rl, category_text, seed)
    return out
