"""Our tokenizer against transformers.AutoTokenizer on the same Qwen2 files, with SID tokens added."""

import shutil

import pytest

from sid.data.config import TasksConfig, TokenizerConfig
from sid.data.minionerec import load_catalog, read_csv
from sid.data.tasks import build_sft_samples, eval_prompts
from sid.data.tokenizer import build_tokenizer, sid_token_key, split_sid

transformers = pytest.importorskip("transformers")

QWEN_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


@pytest.fixture(scope="module")
def tok_dir(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2_tokenizer")
    for name in QWEN_FILES:
        shutil.copy(shared_data / "qwen2_tokenizer" / name, d / name)
    return d


@pytest.fixture(scope="module")
def catalog(shared_data):
    return load_catalog(shared_data / "minionerec_industrial", "Industrial_and_Scientific")


@pytest.fixture(scope="module")
def ours(tok_dir, catalog):
    return build_tokenizer(TokenizerConfig(path=str(tok_dir)), catalog.sid_tokens())


@pytest.fixture(scope="module")
def hf(tok_dir, catalog):
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.add_tokens(catalog.sid_tokens()) == len(catalog.sid_tokens())
    return tok


def test_readme_examples(ours):
    assert ours.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert [ours.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [151643, 151644, 151645]
    assert ours.base_vocab_size == 151646


def test_special_ids_and_sizes_match_transformers(ours, hf, catalog):
    assert ours.eos_id == hf.eos_token_id == 151645  # these are the Instruct files: eos_token <|im_end|>
    assert ours.pad_id == hf.pad_token_id == 151643
    assert hf.bos_token_id is None
    assert ours.vocab_size == len(hf) == 151646 + 560
    assert ours.sid_levels == 3


def test_sid_tokens_are_single_ids_in_numeric_order(ours, catalog):
    tokens = catalog.sid_tokens()
    assert tokens == sorted(tokens, key=lambda t: (t[1], int(t[3:-1])))  # level, then the number
    first = [t for t in tokens if t.startswith("<a_")]
    assert tokens[: len(first)] == first and sorted(first) != first  # numeric, not upstream's string sort
    assert first.index("<a_99>") + 1 == first.index("<a_104>")  # codes 100..103 are unused by this index
    assert list(ours.sid_tokens) == tokens
    for offset, t in enumerate(tokens):
        assert ours.encode(t) == [ours.base_vocab_size + offset]
        assert ours.decode([ours.base_vocab_size + offset]) == t
    sid = catalog.sids[0]
    assert ours.encode(sid) == [ours.token_id(t) for t in split_sid(sid)]


def test_ids_equal_transformers_on_real_prompts(ours, hf, catalog, shared_data):
    rows = read_csv(shared_data / "minionerec_industrial" / "test.csv", catalog)[:150]
    tasks = TasksConfig(next_sid=True, alignment=False, fusion=True, title_history=True)
    samples = build_sft_samples(rows, catalog, tasks, "industrial and scientific items")
    texts = [s.prompt for s in samples] + [s.completion for s in samples]
    texts += [p for p, _ in eval_prompts(rows, TasksConfig())]
    texts += [f'What is the title of item "{catalog.sids[i]}"?\n' + catalog.titles[i] for i in range(0, 3686, 37)]
    texts += [
        "héllo wörld 🤖  \n\n\t tabs, ÅÍ ﬁ (NFC: e\u0301)",
        "<|im_start|>user\nhi<|im_end|>\n<a_1><b_2>x<c_3> <d_4>",
    ]
    assert any("<a_" in t for t in texts)
    got = ours.encode_batch(texts)
    for text, ids in zip(texts, got, strict=True):
        assert ids == hf(text)["input_ids"], text
        assert ours.encode(text) == ids
        assert ours.decode(ids) == hf.decode(ids)


def test_tokenizer_json_round_trip_and_existing_sid_tokens(ours, tok_dir, tmp_path):
    """A tokenizer.json that already has the SID tokens (e.g. an exported run) keeps their ids."""
    shutil.copy(tok_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    ours.tokenizer.save(str(tmp_path / "tokenizer.json"))
    again = build_tokenizer(TokenizerConfig(path=str(tmp_path)), reversed(ours.sid_tokens))
    assert again.vocab_size == again.base_vocab_size == ours.vocab_size
    assert again.sid_tokens == ours.sid_tokens
    text = "The user has interacted with items <a_223><b_80><c_165>, <a_42><b_80><c_160>"
    assert again.encode(text) == ours.encode(text)
    assert (again.eos_id, again.pad_id) == (ours.eos_id, ours.pad_id)


def test_eos_override_and_no_sid_tokens(tok_dir):
    base = build_tokenizer(TokenizerConfig(path=str(tok_dir), eos_token="<|endoftext|>"), ["<a_1>"] * 3)
    assert base.eos_id == 151643 and base.vocab_size == 151647 and base.sid_tokens == ("<a_1>",)
    off = build_tokenizer(TokenizerConfig(path=str(tok_dir), add_sid_tokens=False), ["<a_1>"])
    assert off.vocab_size == off.base_vocab_size == 151646 and off.sid_levels == 0
    assert off.encode("<a_1>") != [151646]


def test_letter_four_levels(shared_data, tok_dir):
    cat = load_catalog(shared_data / "letter_instruments", "Instruments")
    tok = build_tokenizer(TokenizerConfig(path=str(tok_dir)), cat.sid_tokens())
    assert tok.sid_levels == 4 and tok.vocab_size == 151646 + 150 + 3 * 256
    assert tok.token_id("<d_0>") == tok.token_id("<c_255>") + 1


def test_bad_inputs(tok_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="needs tokenizer.json"):
        build_tokenizer(TokenizerConfig(path=str(tmp_path)), None)
    with pytest.raises(ValueError, match="not an SID token"):
        sid_token_key("<a_x>")
    assert split_sid("<a_1><b_2>") == ["<a_1>", "<b_2>"]
    assert split_sid("<a_1> <b_2>") is None and split_sid("abc") is None
