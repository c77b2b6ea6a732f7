"""Bad-input errors of the data readers, and the count of rows skipped because of them.

Every error names the file, the line (1-based) and the field. Row-level errors are skippable: with
`on_bad_row='skip'` a reader records them in a :class:`BadRowReport` (which the trainer writes into
run_summary.json) instead of raising. Errors in catalog files (index/item/info) and missing columns are never
skippable: they would silently change every row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from sid.errors import UserError

logger = logging.getLogger(__name__)

MAX_EXAMPLES = 20


class DataError(UserError, ValueError):
    """A data file that does not fit its format. `reason` is the key this error is counted under when skipped."""

    reason: ClassVar[str] = "bad_data"

    def __init__(self, path: str | Path, line: int | None, field: str | None, why: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.why = why
        where = self.path if line is None else f"{self.path}:{line}"
        what = f" field '{field}':" if field else ""
        super().__init__(f"{where}:{what} {why}")


class CSVSyntaxError(DataError):
    """A CSV row that the csv module cannot parse (a stray or unterminated quote)."""

    reason = "csv_syntax"


class ColumnCountError(DataError):
    """A CSV row with more or fewer fields than the header."""

    reason = "column_count"


class MissingColumnError(DataError):
    """A CSV header without a required column (never skippable)."""

    reason = "missing_column"


class InvalidUTF8Error(DataError):
    """Bytes that are not valid UTF-8."""

    reason = "invalid_utf8"


class ListParseError(DataError):
    """A history column that is not a Python-literal list of the right element type."""

    reason = "unparseable_list"


class FieldValueError(DataError):
    """A field whose value is malformed: a non-integer item id, histories of different lengths, a bad SID string."""

    reason = "bad_value"


class UnknownItemError(DataError):
    """An item id that the index file does not have."""

    reason = "unknown_item"


class UnknownSIDError(DataError):
    """An SID that no item of the index file has."""

    reason = "unknown_sid"


class SIDMismatchError(DataError):
    """An SID that exists in the index, but belongs to other items than the one it is given for."""

    reason = "sid_mismatch"


class EmptyHistoryError(DataError):
    """A sample whose history has no items (nothing to condition on)."""

    reason = "empty_history"


class MalformedJSONError(DataError):
    """A JSON file (index, item, inter) that is not valid JSON or not the expected shape (never skippable)."""

    reason = "malformed_json"


class MissingTitlesError(DataError):
    """A task needs item titles but the dataset has none (LETTER ships no item.json)."""

    reason = "missing_titles"


@dataclass
class BadRowReport:
    """What to do with a bad row ('error': raise, 'skip': count it), and the counts of skipped rows by reason."""

    on_bad_row: Literal["error", "skip"] = "error"
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)
    """The first MAX_EXAMPLES messages, so a summary shows where the bad rows are."""

    def handle(self, err: DataError) -> None:
        """Raise `err` in error mode; otherwise count it (and keep its message if among the first few)."""
        if self.on_bad_row == "error":
            raise err
        self.counts[err.reason] = self.counts.get(err.reason, 0) + 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(str(err))

    @property
    def total(self) -> int:
        """Rows skipped so far."""
        return sum(self.counts.values())

    def warn_if_skipped(self, path: str | Path, before: int) -> None:
        """Log one warning for the rows of `path` skipped since the count was `before` (nothing drops silently)."""
        if self.total > before:
            logger.warning("%s: skipped %d bad rows (%s)", path, self.total - before, self.counts)

    def as_dict(self) -> dict:
        """JSON-ready form for run_summary.json."""
        return {
            "on_bad_row": self.on_bad_row,
            "total": self.total,
            "counts": dict(self.counts),
            "examples": list(self.examples),
        }
