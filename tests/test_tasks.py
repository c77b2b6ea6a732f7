"""The SFT task mix: exact prompt strings, label masks (against HF tokenization), counts, load_split."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from sid.data.config import DataConfig, TasksConfig, TokenizerConfig
from sid.data.dataset import load_split
from sid.data.errors import CSVSyntaxError, MissingTitlesError
from sid.data.minionerec import load_catalog, read_csv
from sid.data.tasks import TASKS, build_sft_samples, encode, encode_all, eval_prompts
from sid.data.tokenizer import build_tokenizer

transformers = pytest.importorskip("transformers")

TINY = Path(__file__).parent / "fixtures" / "tiny"
CATEGORY = "industrial and scientific items"
ALL_TASKS = TasksConfig(next_sid=True, alignment=True, fusion=True, title_history=True)

# Typed from the spec, independently of sid/data/tasks.py.
HEAD = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request. \n\n### Instruction:\n"
)
# Row 3 of Industrial test.csv (user A474): history items 168, 278 -> item 719.
H1, H2, TARGET = "<a_202><b_147><c_0>", "<a_202><b_118><c_74>", "<a_99><b_53><c_168>"
T1 = "Scotch Super 33+ Vinyl Electrical Tape, 3/4 in x 66 ft"
T2 = "T-Rex 241309 Shurtech Ferociously Strong Tape, 12 Yd L X 1.88 in W, 1-Roll, 12 Yards, Gunmetal Gray"
TARGET_TITLE = "Gorilla Heavy Duty Construction Adhesive, 2.5 ounce Squeeze Tube, White"


@pytest.fixture(scope="module")
def industrial(shared_data):
    d = shared_data / "minionerec_industrial"
    catalog = load_catalog(d, "Industrial_and_Scientific")
    return read_csv(d / "test.csv", catalog), catalog


@pytest.fixture(scope="module")
def toks(shared_data, industrial):
    catalog = industrial[1]
    ours = build_tokenizer(TokenizerConfig(path="qwen2_tokenizer"), catalog.sid_tokens(), str(shared_data))
    hf = transformers.AutoTokenizer.from_pretrained(str(shared_data / "qwen2_tokenizer"))
    hf.add_tokens(catalog.sid_tokens())
    return ours, hf


def test_exact_prompts_of_each_task(industrial):
    rows, catalog = industrial
    row = rows[2]
    assert (row.user_id, row.history_ids, row.target_id) == ("A474", (168, 278), 719)
    samples = build_sft_samples([row], catalog, ALL_TASKS, CATEGORY)
    by_task = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    # 3,686 titled items: 3,670 distinct SIDs and 3,646 distinct titles (test_alignment_samples_are_upstreams).
    assert [len(by_task[t]) for t in ("next_sid", "sid2title", "title2sid", "fusion", "title_history")] == [
        1,
        3670,
        3646,
        1,
        1,
    ]

    s = by_task["next_sid"][0]
    assert s.prompt == (
        HEAD + "Can you predict the next possible item that the user may expect?\n\n### User Input: \n"
        f"The user has interacted with items {H1}, {H2} in chronological order. Can you predict the next possible "
        "item that the user may expect?\n\n### Response:\n"
    )
    assert s.completion == TARGET + "\n"

    s = by_task["fusion"][0]
    assert s.prompt == (
        HEAD + "Can you recommend the next item for the user based on their interaction history?\n\n"
        f"### User Input: \nThe user has sequentially interacted with items {H1}, {H2}. Can you recommend the next "
        "item for him? Tell me the title of the item\n\n### Response:\n"
    )
    assert s.completion == TARGET_TITLE + "\n"

    s = by_task["title_history"][0]
    assert s.prompt == (
        HEAD + "Based on the user's historical interaction with item titles, predict the semantic ID of the next "
        "item they may expect.\n\n### User Input: \nThe user has interacted with the following industrial and "
        f'scientific items items in chronological order: "{T1}", "{T2}". Can you predict the next item the user '
        "may expect?\n\n### Response:\n"
    )
    assert s.completion == TARGET + "\n"

    item0 = ("<a_236><b_231><c_226>", "SUPCO SPP6 Relay/Capacitor Hard Start Kit with 500% Increase Starting Torque")
    s = by_task["sid2title"][0]
    assert s.prompt == (
        HEAD + "Answer the question about item identification.\n\n### User Input: \n"
        f'What is the title of item "{item0[0]}"?\n\n### Response:\n'
    )
    assert s.completion == item0[1] + "\n"
    s = by_task["title2sid"][0]
    assert s.prompt == (
        HEAD + "Answer the question about item identification.\n\n### User Input: \n"
        f"Which item has the title: {item0[1]}?\n\n### Response:\n"
    )
    assert s.completion == item0[0] + "\n"


def test_alignment_samples_are_upstreams(shared_data, industrial):
    """Upstream's alignment samples come from two dicts over the raw index and item files, filled in the index's
    order (title -> SID, SID -> title; later items overwrite): built here from the JSON alone."""
    d = shared_data / "minionerec_industrial"
    index = json.loads((d / "Industrial_and_Scientific.index.json").read_text())
    items = json.loads((d / "Industrial_and_Scientific.item.json").read_text())
    sid2title, title2sid = {}, {}
    for item, tokens in index.items():
        if item in items:
            sid2title["".join(tokens)] = items[item]["title"]
            title2sid[items[item]["title"]] = "".join(tokens)
    assert len(sid2title) < len(index) and len(title2sid) < len(index)  # the shipped catalog has both collisions
    samples = build_sft_samples([], industrial[1], TasksConfig(next_sid=False, alignment=True), CATEGORY)
    got = {t: [(s.prompt, s.completion) for s in samples if s.task == t] for t in ("sid2title", "title2sid")}
    frame = HEAD + "Answer the question about item identification.\n\n### User Input: \n{}\n\n### Response:\n"
    assert got["sid2title"] == [
        (frame.format(f'What is the title of item "{sid}"?'), title + "\n") for sid, title in sid2title.items()
    ]
    assert got["title2sid"] == [
        (frame.format(f"Which item has the title: {title}?"), sid + "\n") for title, sid in title2sid.items()
    ]


def test_eval_prompts_both_wordings(industrial):
    rows, catalog = industrial
    prompt, target = eval_prompts(rows, TasksConfig(eval_prompt="eval"))[2]
    assert target == TARGET
    assert prompt == (
        HEAD + "Can you predict the next possible item that the user may expect?\n\n### User Input: \n"
        "Can you predict the next possible item the user may expect, given the following chronological "
        f"interaction history: {H1}, {H2}\n\n### Response:\n"
    )
    train_wording = eval_prompts(rows, TasksConfig(eval_prompt="train"))
    assert (
        train_wording[2][0]
        == build_sft_samples(rows[2:3], catalog, TasksConfig(alignment=False, fusion=False), CATEGORY)[0].prompt
    )
    assert len(train_wording) == len(rows) == 4533


def test_label_mask_against_hf_tokenization(industrial, toks):
    rows, catalog = industrial
    ours, hf = toks
    samples = build_sft_samples(rows[2:3], catalog, ALL_TASKS, CATEGORY)
    picked = {s.task: s for s in samples}
    for s in picked.values():
        enc = encode(s, ours, max_len=4096)
        prompt_ids = hf(s.prompt)["input_ids"]
        completion_ids = hf(s.completion)["input_ids"] + [hf.eos_token_id]
        assert enc["input_ids"].dtype == np.int32 and enc["loss_mask"].dtype == np.bool_
        assert enc["input_ids"].tolist() == prompt_ids + completion_ids
        assert enc["loss_mask"].tolist() == [False] * len(prompt_ids) + [True] * len(completion_ids)
        assert enc["input_ids"][0] == hf("Below")["input_ids"][0]  # no BOS
    # Next SID: the three SID tokens, "\n", EOS are exactly the supervised tokens.
    enc = encode(picked["next_sid"], ours, 4096)
    supervised = enc["input_ids"][enc["loss_mask"]].tolist()
    assert supervised == [ours.token_id(t) for t in ("<a_99>", "<b_53>", "<c_168>")] + [198, ours.eos_id]
    assert hf.decode(supervised) == TARGET + "\n<|im_end|>"


def test_overlong_samples_keep_their_last_tokens(industrial, toks):
    rows, catalog = industrial
    ours, _ = toks
    s = build_sft_samples(rows[:1], catalog, TasksConfig(alignment=False, fusion=False), CATEGORY)[0]
    full = encode(s, ours, 10_000)
    for max_len in (40, 5, 3):
        cut = encode(s, ours, max_len)
        assert cut["input_ids"].tolist() == full["input_ids"][-max_len:].tolist()
        assert cut["loss_mask"].tolist() == full["loss_mask"][-max_len:].tolist()
    assert encode(s, ours, 5)["loss_mask"].all() and encode(s, ours, 6)["loss_mask"].tolist()[0] is False


def test_sample_counts_and_letter_needs_titles(industrial, shared_data):
    rows, catalog = industrial
    seed_mix = build_sft_samples(rows, catalog, TasksConfig(), CATEGORY)
    assert len(seed_mix) == 4533 + 3670 + 3646 + 4533
    letter = DataConfig(source="letter", dir="letter_instruments", category="Instruments", data_root=str(shared_data))
    valid, letter_catalog, report = load_split(letter, "valid")
    assert len(valid) == 24772 and report.total == 0
    with pytest.raises(MissingTitlesError, match=r"tasks \['alignment', 'fusion'\] need item titles"):
        build_sft_samples(valid, letter_catalog, TasksConfig(), "instruments")
    only_sid = build_sft_samples(valid, letter_catalog, TasksConfig(alignment=False, fusion=False), "instruments")
    assert [s.completion for s in only_sid] == [r.target_sid + "\n" for r in valid]


def test_load_split_sources(shared_data, tmp_path):
    mini = DataConfig(source="minionerec", data_root=str(shared_data))
    assert [len(load_split(mini, s)[0]) for s in ("valid", "test")] == [4532, 4533]
    synthetic = DataConfig(source="synthetic", dir="syn", synthetic_items=40, synthetic_users=30)
    train, catalog, _ = load_split(synthetic, "train", run_dir=tmp_path)
    assert (tmp_path / "syn" / "Industrial_and_Scientific.index.json").is_file() and len(catalog.sids) == 40
    assert len(train) > 30
    bad = DataConfig(source="minionerec", dir=str(TINY.resolve()), category="Fixture", test_file="mixed_bad.csv")
    with pytest.raises(CSVSyntaxError, match="mixed_bad.csv:4"):
        load_split(bad, "test")
    rows, _, report = load_split(dataclasses.replace(bad, on_bad_row="skip"), "test")
    assert len(rows) == 2 and report.total == 8 and report.as_dict()["on_bad_row"] == "skip"


def test_encode_all_equals_encode_one_by_one(shared_data):
    rows, catalog, _ = load_split(
        DataConfig(source="minionerec", dir=str(shared_data / "minionerec_industrial")), "test"
    )
    tok = build_tokenizer(TokenizerConfig(path=str(shared_data / "qwen2_tokenizer")), catalog.sid_tokens())
    samples = build_sft_samples(rows[:40], catalog, TasksConfig(title_history=True), "industrial and scientific items")
    for max_len in (512, 64):
        for got, want in zip(
            encode_all(samples, tok, max_len), [encode(s, tok, max_len) for s in samples], strict=True
        ):
            assert got["input_ids"].dtype == want["input_ids"].dtype
            assert (got["input_ids"] == want["input_ids"]).all() and (got["loss_mask"] == want["loss_mask"]).all()
            assert got["task_id"] == want["task_id"]
    # Each sample carries its task's index in TASKS (what the batches' task_ids hold).
    assert [TASKS[e["task_id"]] for e in encode_all(samples, tok, 64)] == [s.task for s in samples]
    assert {s.task for s in samples} == set(TASKS)  # every task, so every index is exercised
    with pytest.raises(ValueError, match="unknown SFT task 'ranking'"):
        encode_all([dataclasses.replace(samples[0], task="ranking")], tok, 64)
