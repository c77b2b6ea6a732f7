"""The synthetic dataset: deterministic bytes, readable by our readers, hierarchical SIDs, learnable sequences."""

import json
from collections import Counter, defaultdict

import pytest

from sid.data.minionerec import load_catalog, read_csv
from sid.data.synthetic import code_word, codebook_size, write_synthetic

FILES = (
    "train.csv",
    "valid.csv",
    "test.csv",
    "info.txt",
    "Cat.index.json",
    "Cat.item.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


def _read(d):
    catalog = load_catalog(d, "Cat")
    return {split: read_csv(d / f"{split}.csv", catalog) for split in ("train", "valid", "test")}, catalog


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    d = write_synthetic(tmp_path_factory.mktemp("syn"), num_items=256, num_users=600, seed=0, category="Cat")
    return d, *_read(d)


def test_same_seed_same_bytes(default, tmp_path):
    d, _, _ = default
    again = write_synthetic(tmp_path / "again", num_items=256, num_users=600, seed=0, category="Cat")
    other = write_synthetic(tmp_path / "other", num_items=256, num_users=600, seed=1, category="Cat")
    assert sorted(p.name for p in d.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (again / name).read_bytes() == (d / name).read_bytes(), name
    assert (other / "train.csv").read_bytes() != (d / "train.csv").read_bytes()
    assert (other / "Cat.index.json").read_bytes() != (d / "Cat.index.json").read_bytes()


def test_hierarchical_unique_sids_and_titles_from_codes(default):
    d, _, catalog = default
    assert codebook_size(256) == 8 and catalog.levels == 3
    assert len(catalog.items_by_sid) == len(catalog.sids) == 256  # unique SIDs
    index = json.loads((d / "Cat.index.json").read_text())
    codes = [[int(t[3:-1]) for t in index[str(i)]] for i in range(256)]
    assert all(0 <= c < 8 for item in codes for c in item)
    # Titles are "<word(b)> <word(c)> <word(a)>": each word names one code of one level.
    for (a, b, c), item in zip(codes, range(256), strict=True):
        assert catalog.titles[item] == f"{code_word(1, b)} {code_word(2, c)} {code_word(0, a)}"
    assert len(set(catalog.titles.values())) == 256
    assert len({code_word(level, k) for level in range(3) for k in range(256)}) == 3 * 256


def test_splits_are_leave_one_out(default):
    _, splits, catalog = default
    train, valid, test = splits["train"], splits["valid"], splits["test"]
    assert len(valid) == len(test) == 600
    assert [r.user_id for r in test] == [f"U{u:05d}" for u in range(600)]
    by_user = defaultdict(list)
    for r in train:
        by_user[r.user_id].append(r)
    for v, t in zip(valid, test, strict=True):
        rows = by_user[v.user_id]
        # Train row k predicts item k+1 of the sequence; valid predicts the next; test the one after.
        seq = [rows[0].history_ids[0]] + [r.target_id for r in rows] + [v.target_id, t.target_id]
        assert 5 <= len(seq) <= 15 and len(rows) == len(seq) - 3
        assert t.history_ids == tuple(seq[:-1][-10:]) and v.history_ids == tuple(seq[:-2][-10:])
        assert all(r.history_ids == tuple(seq[: k + 1][-10:]) for k, r in enumerate(rows))
        assert all(r.target_sid == catalog.sids[r.target_id] for r in rows + [v, t])


def test_bigram_predictor_beats_chance_by_far(default):
    """Learnability: 'most frequent next SID after the last SID' from train, ranked on test."""
    _, splits, _ = default
    following = defaultdict(Counter)
    for r in splits["train"]:
        following[r.history_sids[-1]][r.target_sid] += 1
    hits = sum(
        r.target_sid in [sid for sid, _ in following[r.history_sids[-1]].most_common(10)] for r in splits["test"]
    )
    hr10 = hits / len(splits["test"])
    assert hr10 > 10 * (10 / 256), hr10  # chance is 10/256 = 0.039
    # The first code alone already predicts the next first code well: the hierarchy carries signal.
    first = defaultdict(Counter)
    for r in splits["train"]:
        first[r.history_sids[-1][:7]][r.target_sid[:7]] += 1
    top1 = sum(first[r.history_sids[-1][:7]].most_common(1)[0][0] == r.target_sid[:7] for r in splits["test"])
    assert top1 / len(splits["test"]) > 0.7


@pytest.mark.parametrize("num_items", [2, 20, 1000])
def test_other_sizes(tmp_path, num_items):
    d = write_synthetic(tmp_path, num_items=num_items, num_users=5, seed=3, category="Cat")
    splits, catalog = _read(d)
    k = codebook_size(num_items)
    assert k**3 >= 2 * num_items > (k - 1) ** 3
    assert len(catalog.items_by_sid) == num_items and len(splits["test"]) == 5
    with pytest.raises(ValueError, match="at least 2 items"):
        write_synthetic(tmp_path, num_items=1, num_users=5, seed=0)


def test_ships_its_own_small_tokenizer(default):
    from sid.data.config import TasksConfig, TokenizerConfig
    from sid.data.tasks import build_sft_samples
    from sid.data.tokenizer import build_tokenizer

    d, splits, catalog = default
    tok = build_tokenizer(TokenizerConfig(path=str(d)), catalog.sid_tokens())
    assert tok.base_vocab_size == 512 and tok.vocab_size == 512 + len(catalog.sid_tokens())
    assert tok.tokenizer.id_to_token(tok.eos_id) == "<|endoftext|>"
    assert len(tok.encode("\n")) == 1
    sample = build_sft_samples(splits["test"][:1], catalog, TasksConfig(), "synthetic items")[0]
    ids = tok.encode(sample.prompt + sample.completion)
    assert tok.decode(ids) == sample.prompt + sample.completion  # byte-level BPE: lossless
    sid_ids = tok.encode(splits["test"][0].target_sid)
    assert len(sid_ids) == 3 and all(i >= tok.base_vocab_size for i in sid_ids)
