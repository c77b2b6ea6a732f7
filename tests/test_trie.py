"""The SID trie tables against brute force: walking them accepts exactly the prefixes of catalog SIDs, leaves map
back to their SIDs and items, and the real MiniOneRec (3 levels) and LETTER (4 levels) catalogs build."""

import itertools
import json

import numpy as np
import pytest

from sid.data.minionerec import load_catalog
from sid.data.tokenizer import split_sid
from sid.eval.predictions import explain
from sid.eval.trie import build_trie

NEWLINE, EOS = 5, 7


def _catalog(seed: int = 0):
    rng = np.random.default_rng(seed)
    codebooks = (3, 4, 2)
    names = [[f"<{lv}_{c}>" for c in range(n)] for lv, n in zip("abc", codebooks, strict=True)]
    flat = [t for level in names for t in level]
    token_ids = dict(zip(flat, (100 + rng.permutation(len(flat)) * 3).tolist(), strict=True))
    combos = list(itertools.product(*names))
    chosen = [combos[i] for i in rng.choice(len(combos), 14, replace=False)]
    item_sids = {f"i{n}": "".join(c) for n, c in enumerate(chosen)}
    item_sids.update({"shared_a": item_sids["i3"], "shared_b": item_sids["i3"], "shared_c": item_sids["i9"]})
    return item_sids, token_ids, flat


def _walk(tables, tokens: list[int]) -> int | None:
    """The node reached by feeding `tokens` from the root, or None if the trie does not allow them."""
    children, codes = np.asarray(tables.children), np.asarray(tables.codes)
    node = 0
    for step, tok in enumerate(tokens):
        cols = np.flatnonzero(codes[step] == tok)
        nxt = [children[node, j] for j in cols if children[node, j] >= 0]
        if not nxt:
            return None
        assert len(nxt) == 1
        node = int(nxt[0])
    return node


def test_tables_accept_exactly_the_catalog_prefixes():
    item_sids, token_ids, flat = _catalog()
    trie = build_trie(item_sids, token_ids, end_ids=(NEWLINE, EOS))
    paths = {tuple(token_ids[t] for t in split_sid(sid)) for sid in item_sids.values()}
    prefixes = {p[:n] for p in paths for n in range(1, 4)}
    all_ids = [token_ids[t] for t in flat]
    for n in range(1, 4):
        for seq in itertools.product(all_ids, repeat=n):
            assert (_walk(trie.tables, list(seq)) is not None) == (seq in prefixes), seq
    # Leaves: the distinct SIDs in token-id path order; each full path (and its end tokens) reaches its own leaf.
    assert trie.num_leaves == len(paths) == 14 and trie.depth == 3
    assert [tuple(p) for p in trie.paths.tolist()] == sorted(paths)
    for leaf, sid in enumerate(trie.sids):
        path = [token_ids[t] for t in split_sid(sid)]
        assert trie.paths[leaf].tolist() == path
        assert _walk(trie.tables, path) == _walk(trie.tables, path + [NEWLINE, EOS]) == trie.tables.leaf_offset + leaf
        assert _walk(trie.tables, path + [EOS]) is None
        assert set(trie.leaf_items[leaf]) == {i for i, s in item_sids.items() if s == sid}
    assert trie.items_by_sid()[item_sids["i3"]] == ("i3", "shared_a", "shared_b")
    assert np.asarray(trie.tables.codes)[3:, 0].tolist() == [NEWLINE, EOS]


def test_layout_does_not_depend_on_catalog_order():
    item_sids, token_ids, _ = _catalog(seed=1)
    a = build_trie(item_sids, token_ids, end_ids=(EOS,))
    b = build_trie(dict(reversed(list(item_sids.items()))), token_ids, end_ids=(EOS,))
    np.testing.assert_array_equal(np.asarray(a.tables.children), np.asarray(b.tables.children))
    np.testing.assert_array_equal(np.asarray(a.tables.codes), np.asarray(b.tables.codes))
    assert a.sids == b.sids and [set(x) for x in a.leaf_items] == [set(x) for x in b.leaf_items]


def test_predictions_drop_invalid_beams():
    item_sids, token_ids, _ = _catalog()
    trie = build_trie(item_sids, token_ids, end_ids=(EOS,))
    assert trie.predictions(np.array([[2, 0, -1], [-1, -1, -1]])) == [[trie.sids[2], trie.sids[0]], []]
    with pytest.raises(ValueError, match="batch, beams"):
        trie.predictions(np.array([1, 2]))


@pytest.mark.parametrize(
    ("item_sids", "match"),
    [
        ({}, "empty catalog"),
        ({"x": "<a_0> <b_1>"}, "not a SID"),
        ({"x": "a_0"}, "not a SID"),
        ({"x": "<a_0><b_1>", "y": "<a_0><b_1><c_0>"}, "mixed SID depths"),
        ({"x": "<a_0><b_9>"}, "not in the tokenizer vocabulary"),
    ],
)
def test_bad_catalogs_are_rejected(item_sids, match):
    token_ids = {"<a_0>": 1, "<b_1>": 2, "<c_0>": 3}
    with pytest.raises(ValueError, match=match):
        build_trie(item_sids, token_ids, end_ids=(EOS,))


@pytest.mark.parametrize(
    ("index_file", "depth", "items", "leaves", "first_codes"),
    [
        ("minionerec_industrial/Industrial_and_Scientific.index.json", 3, 3686, 3670, 48),
        ("letter_instruments/Instruments.index.json", 4, 9922, 9897, 150),
    ],
)
def test_real_catalogs(shared_data, index_file, depth, items, leaves, first_codes):
    index = json.loads((shared_data / index_file).read_text())
    item_sids = {item: "".join(tokens) for item, tokens in index.items()}
    vocab = sorted({t for tokens in index.values() for t in tokens})
    token_ids = {t: 1000 + i for i, t in enumerate(vocab)}
    trie = build_trie(item_sids, token_ids, end_ids=(NEWLINE, EOS))
    assert (trie.depth, trie.num_leaves, sum(map(len, trie.leaf_items))) == (depth, leaves, items)
    codes = np.asarray(trie.tables.codes)
    assert int((codes[0] > 0).sum()) == first_codes
    for item in list(index)[:50]:  # spot-check: each item's own path reaches the leaf that lists it
        leaf = _walk(trie.tables, [token_ids[t] for t in index[item]]) - trie.tables.leaf_offset
        assert item in trie.leaf_items[leaf] and trie.sids[leaf] == item_sids[item]


def test_leaves_group_items_like_the_data_catalog(shared_data):
    """Built straight from `Catalog.sids` (int item ids), leaves group exactly the catalog's items that share a SID,
    and `explain` lists every item and title behind a shared SID."""
    catalog = load_catalog(shared_data / "minionerec_industrial", "Industrial_and_Scientific")
    token_ids = {t: 1000 + i for i, t in enumerate(catalog.sid_tokens())}
    trie = build_trie(catalog.sids, token_ids, end_ids=(NEWLINE, EOS))
    assert {s: sorted(i) for s, i in trie.items_by_sid().items()} == catalog.items_by_sid
    shared = next(s for s, items in catalog.items_by_sid.items() if len(items) > 1)
    (row,) = explain([shared], trie.items_by_sid(), catalog.titles)
    assert sorted(row["item_ids"]) == catalog.items_by_sid[shared]
    assert sorted(row["titles"]) == sorted(catalog.titles[i] for i in catalog.items_by_sid[shared])
