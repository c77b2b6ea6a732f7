"""The RL prompt sets (`sid.rl.prompts.rl_prompts`): each set's count, wording and target, the seeded title-history
sample, one prompt per distinct title or description (none for one naming items of different SIDs), and one-line
errors for an unknown set and for title or description sets on a dataset without them."""

import pytest

from sid.config import ConfigError
from sid.data.config import DataConfig, TasksConfig
from sid.data.dataset import load_split
from sid.data.minionerec import Catalog
from sid.data.tasks import ALIGNMENT_INSTRUCTION, TITLE_HISTORY_INSTRUCTION, eval_prompts, frame
from sid.rl.config import PROMPT_TASKS, RLConfig
from sid.rl.prompts import rl_prompts

TASKS = TasksConfig(eval_prompt="train")


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    data = DataConfig(source="synthetic", dir="data", synthetic_items=24, synthetic_users=6)
    rows, catalog, _ = load_split(data, "train", run_dir=tmp_path_factory.mktemp("syn"))
    return rows, catalog


def prompts(split, *names, samples=10000, seed=0):
    rows, catalog = split
    cfg = RLConfig(prompts=names, title_history_samples=samples)
    sets = rl_prompts(rows, catalog, TASKS, cfg, "synthetic items", seed)
    assert list(sets) == [n for n in PROMPT_TASKS if n in names]
    return [pair for pairs in sets.values() for pair in pairs]


def test_each_set_has_its_count_wording_and_target(split):
    rows, catalog = split
    assert prompts(split, "next_sid") == eval_prompts(rows, TASKS)
    titled = sorted(catalog.titles)
    title2sid = prompts(split, "title2sid")
    assert len(title2sid) == len(titled) == 24
    assert title2sid[0] == (
        frame(ALIGNMENT_INSTRUCTION, f"Which item has the title: {catalog.titles[titled[0]]}?"),
        catalog.sids[titled[0]],
    )
    history = prompts(split, "title_history")
    assert [t for _, t in history] == [r.target_sid for r in rows]
    assert history[-1][0].startswith(frame(TITLE_HISTORY_INSTRUCTION, "").split("### User Input")[0])
    assert f'"{rows[-1].history_titles[-1]}"' in history[-1][0]
    everything = prompts(split, "title_history", "next_sid", "title2sid")  # set order: PROMPT_TASKS'
    assert everything == prompts(split, "next_sid") + title2sid + history


def test_description_and_title_sets_have_one_answer_per_prompt(split):
    rows, catalog = split
    a, b, c, d = sorted(catalog.sids)[:4]
    sids = catalog.sids | {d: catalog.sids[a]}  # a and d share an SID, as some catalog items do
    descriptions = {a: "Red, six strings.", b: "A drum.", c: "A drum.", d: "Red, six strings."}
    titles = catalog.titles | {c: catalog.titles[b]}  # b and c: one title, two SIDs
    edited = Catalog(sids, titles, catalog.levels, "X.index.json", descriptions)
    sets = rl_prompts(rows, edited, TASKS, RLConfig(prompts=("description2sid", "title2sid")), "items", 0)
    # a and d: one description, one SID, so one prompt; b and c: one description, two SIDs, so none.
    question = f'An item can be described as follows: "{descriptions[a]}". Which item is it describing?'
    assert sets["description2sid"] == [(frame(ALIGNMENT_INSTRUCTION, question), sids[a])]
    by_title = {titles[i]: sids[i] for i in sorted(titles) if titles[i] != titles[b]}
    question = "Which item has the title: {}?"
    assert sets["title2sid"] == [(frame(ALIGNMENT_INSTRUCTION, question.format(t)), sid) for t, sid in by_title.items()]


def test_title_history_sample_is_seeded_and_in_train_order(split):
    rows, _ = split
    full = prompts(split, "title_history")
    five = prompts(split, "title_history", samples=5)
    assert len(five) == 5 and five == prompts(split, "title_history", samples=5)
    positions = [full.index(p) for p in five]
    assert positions == sorted(positions)
    assert five != prompts(split, "title_history", samples=5, seed=1)
    assert prompts(split, "title_history", samples=0) == full == prompts(split, "title_history", samples=len(rows))


def test_bad_sets_fail_with_one_line(split):
    rows, catalog = split
    with pytest.raises(ConfigError, match=r"rl.prompts=\['next_sid', 'sid2title'\]: give one or more of"):
        prompts(split, "next_sid", "sid2title")
    with pytest.raises(ConfigError, match="give one or more"):
        prompts(split)
    untitled = Catalog(sids=catalog.sids, titles={}, levels=catalog.levels, index_path="Instruments.index.json")
    for name, what in (("title2sid", "titles"), ("description2sid", "descriptions"), ("title_history", "titles")):
        with pytest.raises(ConfigError, match=f"rl.prompts: {name} needs item {what}, but Instruments.index.json"):
            rl_prompts(rows, untitled, TASKS, RLConfig(prompts=(name,)), "items", 0)
