"""MiniOneRec data files and the in-memory form every data source is read into.

Files (upstream `data/Amazon/...`, here `../shared/data/minionerec_industrial`):
- `{category}.index.json`: item id -> SID tokens, e.g. `{"0": ["<a_236>", "<b_231>", "<c_226>"]}`;
- `{category}.item.json`: item id -> {"title", "description", ...};
- `info.txt`: `SID<TAB>title<TAB>item_id` per line;
- train/valid/test CSV: `user_id, history_item_title, item_title, history_item_id, item_id, history_item_sid,
  item_sid`; the history columns are Python-literal lists (parsed with `ast.literal_eval`, never `eval`).

The common form is a :class:`Catalog` (item id -> SID and title) and a list of :class:`Interaction` (a history
and the item that followed). Every bad row raises a :mod:`sid.data.errors` error naming file, line and field,
or is counted in a :class:`BadRowReport` when skipping.
"""

from __future__ import annotations

import ast
import bisect
import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from sid.data.errors import (
    BadRowReport,
    ColumnCountError,
    CSVSyntaxError,
    DataError,
    EmptyHistoryError,
    FieldValueError,
    InvalidUTF8Error,
    ListParseError,
    MalformedJSONError,
    MissingColumnError,
    MissingTitlesError,
    SIDMismatchError,
    UnknownItemError,
    UnknownSIDError,
)
from sid.data.tokenizer import sid_token_key, split_sid

CSV_COLUMNS = (
    "user_id",
    "history_item_title",
    "item_title",
    "history_item_id",
    "item_id",
    "history_item_sid",
    "item_sid",
)
LEVELS = "abcdefghijklmnopqrstuvwxyz"
# Between two entries of a description written as a Python list literal.
_LIST_SEPARATOR = re.compile(r"""['"], ['"]""")
# surrogateescape turns each undecodable byte into one lone surrogate in this range.
_BAD_BYTE = re.compile("[\udc80-\udcff]")


@dataclass(frozen=True, slots=True)
class Interaction:
    """One supervised step of a user's sequence: the items seen so far and the next one."""

    user_id: str
    history_ids: tuple[int, ...]
    history_sids: tuple[str, ...]
    history_titles: tuple[str, ...] | None
    """None when the dataset has no titles (LETTER)."""
    target_id: int
    target_sid: str
    target_title: str | None


@dataclass(frozen=True)
class Catalog:
    """The items of a dataset: item id -> SID string (always), title and description (when the dataset has them).

    SIDs are not unique (3,670 SIDs for 3,686 Industrial items), so `items_by_sid` maps to lists.
    """

    sids: dict[int, str]
    titles: dict[int, str]
    """Empty when the dataset ships no titles."""
    levels: int
    """Tokens per SID."""
    index_path: str
    """The index file, for error messages."""
    descriptions: dict[int, str] = field(default_factory=dict)
    """Item id -> the first entry of its description (`read_item_json`), for the items whose description has text."""

    @cached_property
    def items_by_sid(self) -> dict[str, list[int]]:
        """SID -> the item ids that have it, ascending."""
        out: dict[str, list[int]] = {}
        for item, sid in sorted(self.sids.items()):
            out.setdefault(sid, []).append(item)
        return out

    def sid_tokens(self) -> list[str]:
        """Distinct SID tokens of the catalog, in level then numeric order (the order they get ids in)."""
        tokens = {t for sid in self.items_by_sid for t in split_sid(sid) or ()}
        return sorted(tokens, key=sid_token_key)

    def title(self, item: int, task: str) -> str:
        """The title of `item`, or MissingTitlesError naming the task that needs it."""
        try:
            return self.titles[item]
        except KeyError:
            what = "the dataset has no item titles" if not self.titles else f"item {item} has no title"
            raise MissingTitlesError(
                self.index_path, None, "title", f"task '{task}' needs item titles, but {what}; disable that task"
            ) from None


# ----------------------------------------------------------------------------------------------------------------
# Text and JSON with line numbers.


def read_text(path: Path) -> str:
    """The file as text; invalid UTF-8 raises InvalidUTF8Error with its line and byte offset."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InvalidUTF8Error(path, line, None, f"invalid UTF-8 at byte {e.start}: {data[e.start : e.end]!r}") from e
    return text.removeprefix("\ufeff")


class _Lines:
    """Offset -> 1-based line number in one text."""

    def __init__(self, text: str):
        self.newlines = [m.start() for m in re.finditer("\n", text)]

    def __call__(self, offset: int) -> int:
        return bisect.bisect_left(self.newlines, offset) + 1


_WS = re.compile(r"[ \t\n\r]*")


def read_json_object(path: Path) -> list[tuple[str, Any, int]]:
    """A JSON file whose top level is an object, as (key, value, line of the key) in file order.

    Parsed entry by entry so each entry knows its line, and so repeated keys are an error (json.loads would
    keep the last one silently).
    """
    text = read_text(path)
    line_of = _Lines(text)
    decoder = json.JSONDecoder()
    entries: list[tuple[str, Any, int]] = []
    seen: set[str] = set()

    def fail(pos: int, why: str) -> MalformedJSONError:
        after = f" (after the entry of key {entries[-1][0]!r})" if entries else ""
        return MalformedJSONError(path, line_of(pos), None, why + after)

    i = _WS.match(text).end()
    if text[i : i + 1] != "{":
        raise fail(i, "expected a JSON object at the top level")
    i = _WS.match(text, i + 1).end()
    if text[i : i + 1] == "}":
        return entries
    try:
        while True:
            if text[i : i + 1] != '"':
                raise fail(i, "expected a quoted key")
            key, j = json.decoder.scanstring(text, i + 1)
            line = line_of(i)
            if key in seen:
                raise MalformedJSONError(path, line, key, "key appears twice")
            seen.add(key)
            j = _WS.match(text, j).end()
            if text[j : j + 1] != ":":
                raise fail(j, "expected ':' after a key")
            value, j = decoder.raw_decode(text, _WS.match(text, j + 1).end())
            entries.append((key, value, line))
            i = _WS.match(text, j).end()
            if text[i : i + 1] == "}":
                break
            if text[i : i + 1] != ",":
                raise fail(i, "expected ',' or '}'")
            i = _WS.match(text, i + 1).end()
    except json.JSONDecodeError as e:
        raise MalformedJSONError(path, e.lineno, None, e.msg) from e
    if text[_WS.match(text, i + 1).end() :]:
        raise fail(i + 1, "extra data after the top-level object")
    return entries


# ----------------------------------------------------------------------------------------------------------------
# Catalog files.


def _item_id(path: Path, line: int | None, field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not re.fullmatch(r"\d+", str(value)):
        raise FieldValueError(path, line, field, f"item id must be a non-negative integer, got {value!r}")
    return int(value)


def read_index(path: Path) -> tuple[dict[int, str], int]:
    """`*.index.json` -> (item id -> SID string, number of levels). All items must have the same levels a, b, ..."""
    sids: dict[int, str] = {}
    levels = None
    for key, tokens, line in read_json_object(path):
        item = _item_id(path, line, key, key)
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise MalformedJSONError(path, line, key, f"expected a list of SID tokens, got {tokens!r}")
        sid = "".join(tokens)
        if split_sid(sid) != tokens or "".join(sid_token_key(t)[0] for t in tokens) != LEVELS[: len(tokens)]:
            raise FieldValueError(path, line, key, f"expected tokens <a_n>, <b_n>, ... in level order, got {tokens}")
        if levels is None:
            levels = len(tokens)
        elif len(tokens) != levels:
            raise FieldValueError(path, line, key, f"{len(tokens)} SID levels, but earlier items have {levels}")
        sids[item] = sid
    if not sids:
        raise MalformedJSONError(path, None, None, "the index has no items")
    return sids, levels


def description_entries(value: Any) -> list[str]:
    """The non-empty text entries of an item's `description`: plain text, a JSON list of strings, or a string
    holding a Python list literal (how Amazon's metadata dumps write most of them: "['first', 'second']")."""
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            value = ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            # Some dumps leave a quote inside an entry unescaped; their entries still end at "', '".
            if value[1:2] in ("'", '"'):
                value = _LIST_SEPARATOR.split(value[2:-2])
    entries = value if isinstance(value, list) else [value]
    return [e.strip() for e in entries if isinstance(e, str) and e.strip()]


def read_item_json(path: Path) -> tuple[dict[int, str], dict[int, str]]:
    """`*.item.json` -> (item id -> title, item id -> description). An item's description is the first non-empty
    entry of its `description` (upstream's RL stage takes the first entry); items without one are left out."""
    titles: dict[int, str] = {}
    descriptions: dict[int, str] = {}
    for key, feat, line in read_json_object(path):
        item = _item_id(path, line, key, key)
        if not isinstance(feat, dict) or not isinstance(feat.get("title"), str):
            raise MalformedJSONError(path, line, key, "expected an object with a string 'title'")
        description = feat.get("description", "")
        if not isinstance(description, (str, list)):
            raise FieldValueError(path, line, f"{key}.description", f"expected text or a list, got {description!r}")
        titles[item] = feat["title"]
        if entries := description_entries(description):
            descriptions[item] = entries[0]
    return titles, descriptions


def read_info(path: Path) -> list[tuple[str, str, int, int]]:
    """`info.txt` -> (SID, title, item id, line) per line."""
    out = []
    lines = read_text(path).split("\n")
    if lines[-1] == "":
        lines.pop()
    for n, raw in enumerate(lines, start=1):
        parts = raw.removesuffix("\r").split("\t")
        if len(parts) != 3:
            field = ("SID", "title", "item_id")[len(parts)] if len(parts) < 3 else "#4 (no such column)"
            raise ColumnCountError(
                path, n, field, f"expected 3 tab-separated fields (SID, title, item_id), got {len(parts)}"
            )
        sid, title, item = parts
        if split_sid(sid) is None:
            raise FieldValueError(path, n, "SID", f"not an SID string: {sid!r}")
        out.append((sid, title, _item_id(path, n, "item_id", item), n))
    return out


def load_catalog(directory: Path, category: str) -> Catalog:
    """The catalog of a MiniOneRec-format directory: `{category}.index.json`, titles from `{category}.item.json`
    (else `info.txt`, else none). When info.txt is present it must agree with the index and item files."""
    index_path = directory / f"{category}.index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"index file {index_path} not found (data.dir / data.category)")
    sids, levels = read_index(index_path)
    item_path, info_path = directory / f"{category}.item.json", directory / "info.txt"
    titles, descriptions = read_item_json(item_path) if item_path.is_file() else ({}, {})
    for item in titles:
        if item not in sids:
            raise UnknownItemError(item_path, None, str(item), "item is not in the index file")
    if info_path.is_file():
        from_item_json = bool(titles)
        for sid, title, item, line in read_info(info_path):
            if item not in sids:
                raise UnknownItemError(info_path, line, "item_id", f"item {item} is not in {index_path.name}")
            if sids[item] != sid:
                raise SIDMismatchError(info_path, line, "SID", f"{sid} but {index_path.name} says {sids[item]}")
            if not from_item_json:
                titles[item] = title
            elif titles.get(item) != title:
                raise FieldValueError(
                    info_path, line, "title", f"{title!r} but {item_path.name} says {titles.get(item)!r}"
                )
    return Catalog(sids=sids, titles=titles, levels=levels, index_path=str(index_path), descriptions=descriptions)


# ----------------------------------------------------------------------------------------------------------------
# Rows (shared with the LETTER reader).


def check_item(
    path: Path,
    line: int | None,
    catalog: Catalog,
    item: int,
    item_field: str,
    sid: str | None = None,
    sid_field: str = "",
) -> None:
    """Check that `item` is in the catalog and, if `sid` is given, that it is the item's SID."""
    if item not in catalog.sids:
        raise UnknownItemError(path, line, item_field, f"item {item} is not in {Path(catalog.index_path).name}")
    if sid is not None and sid != catalog.sids[item]:
        index_name = Path(catalog.index_path).name
        if sid not in catalog.items_by_sid:
            raise UnknownSIDError(path, line, sid_field, f"SID {sid} (of item {item}) is not in {index_name}")
        raise SIDMismatchError(
            path, line, sid_field, f"item {item} has SID {catalog.sids[item]} in {index_name}, not {sid}"
        )


def _csv_error_column(raw: str) -> int:
    """Index of the field where a CSV syntax error is, by scanning the row's first line for quote state."""
    column, in_quotes, i = 0, False, 0
    quote_opened_at = 0
    while i < len(raw):
        c = raw[i]
        if in_quotes:
            if c == '"':
                if raw[i + 1 : i + 2] == '"':
                    i += 1
                else:
                    in_quotes = False
                    if raw[i + 1 : i + 2] not in (",", "\n", "\r", ""):
                        return column
        elif c == '"':
            in_quotes, quote_opened_at = True, column
        elif c == ",":
            column += 1
        i += 1
    return quote_opened_at if in_quotes else column


def iter_csv(path: Path, bad_rows: BadRowReport) -> Iterator[tuple[int, dict[str, str]]]:
    """(first line, row as column -> value) for each CSV row; syntax, column-count and UTF-8 errors are handled
    by `bad_rows` (raise, or count and skip)."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    lines = list(io.StringIO(text, newline=""))
    reader = csv.reader(iter(lines), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise MissingColumnError(path, 1, None, f"empty file; expected header {','.join(CSV_COLUMNS)}") from None
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise MissingColumnError(path, 1, missing[0], f"header lacks column(s) {missing}; got {header}")
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            col = _csv_error_column(lines[line - 1])
            # An unterminated quote swallows the lines after it: say how many, so none go missing unseen.
            span = f" (this bad row runs to line {reader.line_num})" if reader.line_num > line else ""
            field = header[col] if col < len(header) else f"#{col + 1}"
            bad_rows.handle(CSVSyntaxError(path, line, field, f"{e}{span}"))
            continue
        if not row:
            continue  # a blank line is not a row
        if len(row) != len(header):
            # Name the first column that has no value, or the first value that has no column.
            field = header[len(row)] if len(row) < len(header) else f"#{len(header) + 1} (no such column)"
            bad_rows.handle(ColumnCountError(path, line, field, f"{len(row)} fields, but the header has {len(header)}"))
            continue
        fields = dict(zip(header, row, strict=True))
        bad = next((c for c in header if _BAD_BYTE.search(fields[c])), None)
        if bad is not None:
            raw = _BAD_BYTE.search(fields[bad]).group().encode("utf-8", errors="surrogateescape")
            bad_rows.handle(InvalidUTF8Error(path, line, bad, f"invalid UTF-8 byte {raw!r}"))
            continue
        yield line, fields


def _literal_list(path: Path, line: int, field: str, text: str, kind: type) -> list:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
        raise ListParseError(path, line, field, f"not a Python list literal ({type(e).__name__}): {text[:80]!r}") from e
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ListParseError(path, line, field, f"expected a list of {kind.__name__}, got {text[:80]!r}")
    return value


def _parse_row(path: Path, line: int, f: dict[str, str], catalog: Catalog) -> Interaction:
    titles = _literal_list(path, line, "history_item_title", f["history_item_title"], str)
    ids = _literal_list(path, line, "history_item_id", f["history_item_id"], int)
    sids = _literal_list(path, line, "history_item_sid", f["history_item_sid"], str)
    if not ids:
        raise EmptyHistoryError(path, line, "history_item_id", "the history is empty")
    if not len(titles) == len(ids) == len(sids):
        raise FieldValueError(
            path,
            line,
            "history_item_title",
            f"history lengths differ: {len(titles)} titles, {len(ids)} ids, {len(sids)} SIDs",
        )
    for item, sid in zip(ids, sids, strict=True):
        check_item(path, line, catalog, item, "history_item_id", sid, "history_item_sid")
    target = _item_id(path, line, "item_id", f["item_id"])
    check_item(path, line, catalog, target, "item_id", f["item_sid"], "item_sid")
    return Interaction(
        user_id=f["user_id"],
        history_ids=tuple(ids),
        history_sids=tuple(sids),
        history_titles=tuple(titles),
        target_id=target,
        target_sid=f["item_sid"],
        target_title=f["item_title"],
    )


def read_csv(path: Path, catalog: Catalog, bad_rows: BadRowReport | None = None) -> list[Interaction]:
    """The rows of a MiniOneRec train/valid/test CSV, checked against the catalog.

    Bad rows raise (default) or, with `BadRowReport(on_bad_row='skip')`, are counted there and left out.
    """
    bad_rows = bad_rows if bad_rows is not None else BadRowReport()
    before = bad_rows.total
    out = []
    for line, fields in iter_csv(path, bad_rows):
        try:
            out.append(_parse_row(path, line, fields, catalog))
        except DataError as e:
            bad_rows.handle(e)
    bad_rows.warn_if_skipped(path, before)
    return out
