"""The MiniOneRec SFT task mix (prompt/completion text), its tokenization with loss masks, and the eval prompts.
(Reading a split from whichever source the config names is `sid.data.dataset.load_split`.)

Every task uses upstream's frame (note the spaces after `request.` and after `Input:`); the completion is
`"{OUTPUT}\\n"`, followed by EOS when tokenized. Prompt tokens are not supervised, there is no BOS, and an
over-long sample keeps its last `max_len` tokens, as upstream does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from sid.data.config import DataConfig, TasksConfig
from sid.data.errors import MissingTitlesError
from sid.data.minionerec import Catalog, Interaction
from sid.data.pipeline import BatchPlan
from sid.data.tokenizer import SIDTokenizer

FRAME = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. \n\n"
    "### Instruction:\n{instruction}\n\n### User Input: \n{input}\n\n### Response:\n"
)
NEXT_SID_INSTRUCTION = "Can you predict the next possible item that the user may expect?"
ALIGNMENT_INSTRUCTION = "Answer the question about item identification."
FUSION_INSTRUCTION = "Can you recommend the next item for the user based on their interaction history?"
TITLE_HISTORY_INSTRUCTION = (
    "Based on the user's historical interaction with item titles, "
    "predict the semantic ID of the next item they may expect."
)


TASKS = ("next_sid", "sid2title", "title2sid", "fusion", "title_history")
"""Every SFT task name (`Sample.task`); a batch's `task_ids` index into this tuple."""


@dataclass(frozen=True)
class Sample:
    """One SFT example: the framed prompt, the completion (`OUTPUT + "\\n"`, EOS added when encoding), its task."""

    prompt: str
    completion: str
    task: str


def frame(instruction: str, user_input: str) -> str:
    """The full prompt text of one sample."""
    return FRAME.format(instruction=instruction, input=user_input)


def next_sid_input(history_sids: Sequence[str], wording: Literal["train", "eval"] = "train") -> str:
    """INPUT of the next-SID task: upstream trains with one wording and evaluates with another."""
    sids = ", ".join(history_sids)
    if wording == "train":
        return (
            f"The user has interacted with items {sids} in chronological order. "
            "Can you predict the next possible item that the user may expect?"
        )
    return (
        "Can you predict the next possible item the user may expect, "
        f"given the following chronological interaction history: {sids}"
    )


def _next_sid(it: Interaction) -> Sample:
    return Sample(frame(NEXT_SID_INSTRUCTION, next_sid_input(it.history_sids)), it.target_sid + "\n", "next_sid")


SID2TITLE_QUESTION = 'What is the title of item "{}"?'
TITLE2SID_QUESTION = "Which item has the title: {}?"


def _alignment_items(catalog: Catalog, key: Callable[[int], str]) -> list[int]:
    """One titled item per distinct `key(item)`: the last in the index file's order, at the place of the first.
    Upstream builds its alignment samples from a dict filled so, which drops the contradictory ones (two items
    with one title give one title2sid sample, the later item's SID; two with one SID, one sid2title sample)."""
    last: dict[str, int] = {}
    for item in catalog.sids:
        if item in catalog.titles:
            last[key(item)] = item
    return list(last.values())


def sid2title_samples(catalog: Catalog) -> list[Sample]:
    """SID -> title, one per distinct SID of the titled items (`_alignment_items`)."""
    return [
        Sample(frame(ALIGNMENT_INSTRUCTION, SID2TITLE_QUESTION.format(catalog.sids[i])), catalog.titles[i] + "\n",
               "sid2title")
        for i in _alignment_items(catalog, catalog.sids.__getitem__)
    ]  # fmt: skip


def title2sid_samples(catalog: Catalog) -> list[Sample]:
    """Title -> SID, one per distinct title (`_alignment_items`)."""
    return [
        Sample(frame(ALIGNMENT_INSTRUCTION, TITLE2SID_QUESTION.format(catalog.titles[i])), catalog.sids[i] + "\n",
               "title2sid")
        for i in _alignment_items(catalog, catalog.titles.__getitem__)
    ]  # fmt: skip


def _fusion(it: Interaction, catalog: Catalog) -> Sample:
    user_input = (
        f"The user has sequentially interacted with items {', '.join(it.history_sids)}. "
        "Can you recommend the next item for him? Tell me the title of the item"
    )
    return Sample(frame(FUSION_INSTRUCTION, user_input), catalog.title(it.target_id, "fusion") + "\n", "fusion")


def title_history_sample(it: Interaction, category_text: str) -> Sample:
    """The next SID from the history's item titles."""
    titles = ", ".join(f'"{t}"' for t in it.history_titles)
    # Upstream passes the category text (e.g. "industrial and scientific items") into "... following {} items",
    # so the prompt really says "items items"; kept for parity with its checkpoints.
    user_input = (
        f"The user has interacted with the following {category_text} items in chronological order: {titles}. "
        "Can you predict the next item the user may expect?"
    )
    return Sample(frame(TITLE_HISTORY_INSTRUCTION, user_input), it.target_sid + "\n", "title_history")


def build_sft_samples(
    interactions: Sequence[Interaction], catalog: Catalog, tasks: TasksConfig, category_text: str
) -> list[Sample]:
    """The enabled tasks' samples, task by task (the pipeline shuffles). Tasks that need titles raise
    MissingTitlesError on a dataset without them (LETTER)."""
    need_titles = [
        t
        for t, on in [("alignment", tasks.alignment), ("fusion", tasks.fusion), ("title_history", tasks.title_history)]
        if on
    ]
    if need_titles and not catalog.titles:
        raise MissingTitlesError(
            catalog.index_path,
            None,
            "title",
            f"tasks {need_titles} need item titles, but this dataset has none (LETTER ships no item.json); "
            f"switch them off in the tasks config (e.g. tasks.{need_titles[0]}: false)",
        )
    out: list[Sample] = []
    if tasks.next_sid:
        out += [_next_sid(it) for it in interactions]
    if tasks.alignment:
        out += sid2title_samples(catalog) + title2sid_samples(catalog)
    if tasks.fusion:
        out += [_fusion(it, catalog) for it in interactions]
    if tasks.title_history:
        out += [title_history_sample(it, category_text) for it in interactions]
    return out


def encode(sample: Sample, tok: SIDTokenizer, max_len: int) -> dict[str, np.ndarray | int]:
    """`input_ids` (int32) and `loss_mask` (bool; True on completion + EOS) of one sample, truncated from the left
    to `max_len`, and `task_id` (the index of its task in TASKS). Prompt and completion are tokenized separately
    and concatenated, as upstream does."""
    return _assemble(tok.encode(sample.prompt), tok.encode(sample.completion), tok.eos_id, max_len, sample.task)


def encode_all(samples: Sequence[Sample], tok: SIDTokenizer, max_len: int) -> list[dict[str, np.ndarray | int]]:
    """`encode` for many samples at once: the tokenizer's batch call runs on every core."""
    prompts = tok.encode_batch([s.prompt for s in samples])
    completions = tok.encode_batch([s.completion for s in samples])
    return [_assemble(p, c, tok.eos_id, max_len, s.task) for p, c, s in zip(prompts, completions, samples, strict=True)]


def _assemble(
    prompt: list[int], completion: list[int], eos_id: int, max_len: int, task: str
) -> dict[str, np.ndarray | int]:
    if task not in TASKS:
        raise ValueError(f"unknown SFT task {task!r}: expected one of {TASKS}")
    ids = np.asarray(prompt + completion + [eos_id], dtype=np.int32)
    mask = np.arange(len(ids)) >= len(prompt)
    return {"input_ids": ids[-max_len:], "loss_mask": mask[-max_len:], "task_id": TASKS.index(task)}


def eval_prompts(interactions: Sequence[Interaction], tasks_cfg: TasksConfig) -> list[tuple[str, str]]:
    """(prompt, target SID) per interaction, in the next-SID wording `tasks_cfg.eval_prompt` selects."""
    wording = tasks_cfg.eval_prompt
    return [
        (frame(NEXT_SID_INSTRUCTION, next_sid_input(it.history_sids, wording)), it.target_sid) for it in interactions
    ]


def sft_plan(samples: Sequence[Sample], tok: SIDTokenizer, cfg: DataConfig, rows_per_step: int) -> BatchPlan:
    """Samples -> the batch plan of the config's layout (packed rows or length buckets)."""
    return BatchPlan(
        encode_all(samples, tok, cfg.max_len),
        rows_per_step=rows_per_step,
        max_len=cfg.max_len,
        pack=cfg.pack,
        buckets=cfg.length_buckets,
    )
