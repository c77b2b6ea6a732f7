"""MiniOneRec and LETTER readers on the real files, and every kind of bad input on small fixtures."""

import ast
import csv
import json
import re
from pathlib import Path

import pytest

from sid.data import errors
from sid.data.errors import BadRowReport
from sid.data.letter import leave_one_out, read_letter
from sid.data.minionerec import description_entries, load_catalog, read_csv

FIXTURES = Path(__file__).parent / "fixtures"
TINY = FIXTURES / "tiny"


@pytest.fixture(scope="module")
def industrial(shared_data):
    return shared_data / "minionerec_industrial"


@pytest.fixture(scope="module")
def catalog(industrial):
    return load_catalog(industrial, "Industrial_and_Scientific")


def test_catalog_matches_the_raw_files(industrial, catalog):
    index = json.loads((industrial / "Industrial_and_Scientific.index.json").read_text())
    items = json.loads((industrial / "Industrial_and_Scientific.item.json").read_text())
    assert catalog.sids == {int(k): "".join(v) for k, v in index.items()}
    assert catalog.titles == {int(k): v["title"] for k, v in items.items()}
    assert catalog.levels == 3
    # README: 3,670 distinct SIDs for 3,686 items, so some SIDs name several items.
    assert len(catalog.sids) == 3686 and len(catalog.items_by_sid) == 3670
    shared = [items for items in catalog.items_by_sid.values() if len(items) > 1]
    assert sum(len(x) for x in shared) - len(shared) == 16
    for sid, ids in catalog.items_by_sid.items():
        assert all(catalog.sids[i] == sid for i in ids)


def test_catalog_descriptions_are_the_first_entry_of_each_list(industrial, catalog):
    items = json.loads((industrial / "Industrial_and_Scientific.item.json").read_text())
    expected, malformed = {}, {}
    for key, feat in items.items():  # independently: the raw descriptions are Python list literals or text
        raw = feat["description"]
        try:
            entries = ast.literal_eval(raw) if raw[:1] == "[" and raw[-1:] == "]" else [raw]
        except SyntaxError:  # an unescaped quote inside an entry
            malformed[int(key)] = raw
            continue
        if first := next((e.strip() for e in entries if e.strip()), None):
            expected[int(key)] = first
    assert {i: d for i, d in catalog.descriptions.items() if i not in malformed} == expected
    assert 3000 < len(expected) < len(items) and 0 < len(malformed) < 20  # 229 items have an empty description
    for item, raw in malformed.items():  # the first entry, up to "', '" (or the list's end)
        first = catalog.descriptions[item]
        assert raw[2:].startswith(first) and re.match(r"""['"](, ['"]|]$)""", raw[len(first) + 2 :])


@pytest.mark.parametrize(
    "value,entries",
    [
        ("Six strings.", ["Six strings."]),
        ("['One', 'Two']", ["One", "Two"]),
        ('["It\'s one", "two"]', ["It's one", "two"]),
        (["json", " list ", ""], ["json", "list"]),
        ("['', '  ', 'third']", ["third"]),
        ("[]", []),
        ("", []),
        ("[Pack of 3]", ["[Pack of 3]"]),  # looks like a list, is text
        ("['5' long', \"it's\", 'c']", ["5' long", "it's", "c"]),  # an unescaped quote
        ("[1, 'a']", ["a"]),
        (None, []),
    ],
)
def test_description_entries(value, entries):
    assert description_entries(value) == entries


def test_bad_description_names_file_line_and_item(tmp_path):
    (tmp_path / "X.index.json").write_text('{"0": ["<a_1>"], "1": ["<a_2>"]}')
    (tmp_path / "X.item.json").write_text('{"0": {"title": "a"},\n "1": {"title": "b", "description": 7}}')
    with pytest.raises(errors.FieldValueError, match=r"X.item.json:2: field '1.description': expected text or a list"):
        load_catalog(tmp_path, "X")
    (tmp_path / "X.item.json").write_text('{"0": {"title": "a"}, "1": {"title": "b", "description": "[\'bee\']"}}')
    assert load_catalog(tmp_path, "X").descriptions == {1: "bee"}


@pytest.mark.parametrize("name,rows", [("test.csv", 4533), ("valid.csv", 4532), ("train_partial.csv", 10393)])
def test_minionerec_rows_equal_an_independent_parse(industrial, catalog, name, rows):
    got = read_csv(industrial / name, catalog)
    assert len(got) == rows
    with open(industrial / name, newline="", encoding="utf-8") as f:
        expected = list(csv.DictReader(f))
    for it, row in zip(got, expected, strict=True):
        assert it.user_id == row["user_id"]
        assert list(it.history_ids) == ast.literal_eval(row["history_item_id"])
        assert list(it.history_sids) == ast.literal_eval(row["history_item_sid"])
        assert list(it.history_titles) == ast.literal_eval(row["history_item_title"])
        assert (it.target_id, it.target_sid, it.target_title) == (
            int(row["item_id"]),
            row["item_sid"],
            row["item_title"],
        )


def test_first_test_row(industrial, catalog):
    it = read_csv(industrial / "test.csv", catalog)[0]
    assert it.user_id == "A6948"
    assert it.history_ids == (3466, 2697, 3557, 2660, 2507, 2152, 3453, 1888, 2544, 3669)
    assert it.history_sids[0] == "<a_223><b_80><c_165>"
    assert it.history_titles[-1].startswith("HATCHBOX PETG 3D Printer Filament")
    assert (it.target_id, it.target_sid) == (3681, "<a_223><b_80><c_216>")
    assert it.target_title == "3D Solutech Real Orange 1.75mm ABS 3D Printer Filament 2.2 LBS (1.0KG)"


@pytest.fixture(scope="module")
def letter_seqs(shared_data):
    return json.loads((shared_data / "letter_instruments" / "Instruments.inter.json").read_text())


@pytest.fixture(scope="module")
def letter_splits(shared_data):
    d = shared_data / "letter_instruments"
    return {split: read_letter(d, "Instruments", split) for split in ("train", "valid", "test")}


def test_letter_leave_one_out_sizes(letter_seqs, letter_splits):
    (train, catalog), (valid, _), (test, _) = letter_splits.values()
    assert len(valid) == len(test) == 24772
    # README: 156,609 items in the training prefixes seq[:-2]; each prefix of length m gives m - 1 rows.
    assert sum(len(s) - 2 for s in letter_seqs.values()) == 156609
    assert len(train) == 156609 - 24772 == 131837
    assert catalog.levels == 4 and not catalog.titles
    assert len(catalog.sid_tokens()) == 150 + 3 * 256  # README: distinct codes per level a=150, b=c=d=256
    assert max(len(r.history_ids) for r in train + valid + test) == 20


@pytest.mark.parametrize("max_history", [20, 3])
def test_letter_rows_of_one_user_brute_force(shared_data, letter_seqs, letter_splits, max_history):
    index = json.loads((shared_data / "letter_instruments" / "Instruments.index.json").read_text())
    user = max(letter_seqs, key=lambda u: len(letter_seqs[u]))  # 218 items: histories get cut
    seq = letter_seqs[user]
    expected = {
        "train": [(seq[:t], seq[t]) for t in range(1, len(seq) - 2)],
        "valid": [(seq[:-2], seq[-2])],
        "test": [(seq[:-1], seq[-1])],
    }
    for split, pairs in expected.items():
        rows, catalog = letter_splits[split]
        if max_history == 20:  # the default, as read_letter used it
            rows = [r for r in rows if r.user_id == user]
        else:
            rows = leave_one_out(user, seq, catalog, split, max_history)
        assert [(list(r.history_ids), r.target_id) for r in rows] == [(h[-max_history:], t) for h, t in pairs]
        for r in rows:
            assert r.target_sid == "".join(index[str(r.target_id)])
            assert r.history_sids == tuple("".join(index[str(i)]) for i in r.history_ids)


def test_good_fixture_reads():
    catalog = load_catalog(TINY, "Fixture")
    rows = read_csv(TINY / "good.csv", catalog)
    assert [(r.user_id, r.history_ids, r.target_id) for r in rows] == [
        ("u1", (0, 1), 2),
        ("u2", (2,), 3),
        ("u3", (0, 1, 2, 3), 4),
    ]


BAD_CSV = [
    ("csv_syntax", errors.CSVSyntaxError, "history_item_title"),
    ("column_count", errors.ColumnCountError, "#8"),
    ("unparseable_list", errors.ListParseError, "history_item_id"),
    ("unknown_sid", errors.UnknownSIDError, "history_item_sid"),
    ("sid_mismatch", errors.SIDMismatchError, "item_sid"),
    ("unknown_item", errors.UnknownItemError, "item_id"),
    ("empty_history", errors.EmptyHistoryError, "history_item_id"),
    ("invalid_utf8", errors.InvalidUTF8Error, "item_title"),
]


@pytest.mark.parametrize("name,error,field", BAD_CSV)
def test_bad_csv_row_raises_naming_file_line_field(name, error, field):
    catalog = load_catalog(TINY, "Fixture")
    with pytest.raises(error) as e:
        read_csv(TINY / f"{name}.csv", catalog)
    assert type(e.value) is error
    assert (e.value.line, e.value.field.split(" ")[0]) == (3, field)
    assert f"{TINY / name}.csv:3: field '{field}" in str(e.value)


@pytest.mark.parametrize("name,error,field", BAD_CSV)
def test_bad_csv_row_skipped_and_counted(name, error, field):
    report = BadRowReport(on_bad_row="skip")
    rows = read_csv(TINY / f"{name}.csv", load_catalog(TINY, "Fixture"), report)
    assert [r.user_id for r in rows] == ["u1", "u3"]
    assert report.counts == {error.reason: 1}
    assert report.as_dict()["total"] == 1 and f"{name}.csv:3:" in report.examples[0]


def test_every_bad_kind_in_one_file_is_counted_with_its_line():
    report = BadRowReport(on_bad_row="skip")
    rows = read_csv(TINY / "mixed_bad.csv", load_catalog(TINY, "Fixture"), report)
    # Lines 2-3 hold one good row with a quoted two-line title; lines 4..11 one bad row each; line 12 good.
    assert [(r.user_id, r.target_title) for r in rows] == [("u0", "Blue\nGadget"), ("u3", "Purple Doohickey")]
    assert report.counts == {err.reason: 1 for _, err, _ in BAD_CSV}
    assert [int(m.split(":")[1]) for m in report.examples] == list(range(4, 12))


def test_missing_column_is_never_skipped():
    with pytest.raises(errors.MissingColumnError, match=r"missing_column.csv:1: field 'item_sid'"):
        read_csv(TINY / "missing_column.csv", load_catalog(TINY, "Fixture"), BadRowReport(on_bad_row="skip"))


def test_bad_json_names_file_and_line(tmp_path):
    with pytest.raises(errors.MalformedJSONError, match=r"bad_json/Fixture.index.json:4: .*after the entry of key '1'"):
        load_catalog(FIXTURES / "bad_json", "Fixture")
    with pytest.raises(errors.MalformedJSONError, match=r"Dup.index.json:3: field '0': key appears twice"):
        load_catalog(FIXTURES / "bad_json", "Dup")
    (tmp_path / "X.index.json").write_bytes(b'{"0": ["<a_1>"],\n "1": ["<a_\xff>"]}')
    with pytest.raises(errors.InvalidUTF8Error, match=r"X.index.json:2: invalid UTF-8 at byte 28"):
        load_catalog(tmp_path, "X")
    (tmp_path / "Y.index.json").write_text('{"0": ["<a_1>", "<b_2>"],\n"1": ["<b_1>", "<a_2>"]}')
    with pytest.raises(errors.FieldValueError, match=r"Y.index.json:2: field '1': expected tokens"):
        load_catalog(tmp_path, "Y")


def test_info_txt_must_agree_with_the_index(tmp_path):
    for f in TINY.glob("Fixture.*.json"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    lines = (TINY / "info.txt").read_text().splitlines(keepends=True)
    (tmp_path / "info.txt").write_text("".join(lines[:2]) + lines[2].replace("<c_0>", "<c_5>") + "".join(lines[3:]))
    with pytest.raises(errors.SIDMismatchError, match=r"info.txt:3: field 'SID'"):
        load_catalog(tmp_path, "Fixture")
    (tmp_path / "Fixture.item.json").unlink()  # titles then come from info.txt
    (tmp_path / "info.txt").write_text("".join(lines))
    assert load_catalog(tmp_path, "Fixture").titles == load_catalog(TINY, "Fixture").titles


def test_letter_bad_users():
    d = FIXTURES / "letter"
    with pytest.raises(errors.UnknownItemError, match=r"Fixture.inter.json:10: field '1': item 42"):
        read_letter(d, "Fixture", "train")
    report = BadRowReport(on_bad_row="skip")
    train, catalog = read_letter(d, "Fixture", "train", bad_rows=report)
    # Users 1 (unknown item), 2 (two items) and 3 (not a list) are left out of every split, and counted.
    assert report.counts == {"unknown_item": 1, "empty_history": 1, "bad_value": 1}
    assert [(r.user_id, r.history_ids, r.target_id) for r in train] == [
        ("0", (0,), 1),
        ("0", (0, 1), 2),
        ("0", (0, 1, 2), 3),
        ("4", (7,), 6),
        ("4", (7, 6), 5),
    ]
    test, _ = read_letter(d, "Fixture", "test", max_history=2, bad_rows=BadRowReport(on_bad_row="skip"))
    assert [(r.history_ids, r.target_id, r.target_sid) for r in test] == [
        ((3, 4), 5, catalog.sids[5]),
        ((5, 4), 3, "<a_0><b_3><c_1><d_1>"),
    ]


def test_unterminated_quote_reports_the_lines_it_swallows(tmp_path):
    lines = (TINY / "good.csv").read_text().splitlines(keepends=True)
    (tmp_path / "x.csv").write_text(
        "".join(lines[:2]) + lines[2].replace(",<a_1><b_0><c_1>", ',"<a_1><b_0><c_1>') + lines[3]
    )
    report = BadRowReport(on_bad_row="skip")
    rows = read_csv(tmp_path / "x.csv", load_catalog(TINY, "Fixture"), report)
    assert [r.user_id for r in rows] == ["u1"]
    assert report.counts == {"csv_syntax": 1}
    assert report.examples[0].startswith(f"{tmp_path / 'x.csv'}:3: field 'item_sid': ")
    assert report.examples[0].endswith("(this bad row runs to line 4)")


def test_letter_max_users_keeps_the_first_good_users(shared_data, letter_splits):
    d = shared_data / "letter_instruments"
    for split, (full, _) in letter_splits.items():
        subset, _ = read_letter(d, "Instruments", split, max_users=50)
        first = {str(u) for u in range(50)}  # inter.json lists users "0", "1", ... in order, all of them good
        assert subset == [r for r in full if r.user_id in first], split
    # Bad users do not count towards the limit: the fixture's good users are 0 and 4.
    report = BadRowReport(on_bad_row="skip")
    test, _ = read_letter(FIXTURES / "letter", "Fixture", "test", max_users=2, bad_rows=report)
    assert [r.user_id for r in test] == ["0", "4"]
    with pytest.raises(ValueError, match="max_users must be >= 0"):
        read_letter(d, "Instruments", "test", max_users=-1)
