"""LETTER data (`{category}.inter.json` + `{category}.index.json`) as leave-one-out splits.

`inter.json` maps a user to its chronological item ids; `index.json` maps an item to its SID tokens (4 levels
for LETTER). For a sequence `seq` of length n the splits are (each history cut to its last `max_history` items):
- train: for t in 1 .. n-3, predict seq[t] from seq[:t] (every prefix of seq[:-2]);
- valid: predict seq[-2] from seq[:-2];
- test:  predict seq[-1] from seq[:-1].

LETTER ships no item.json, so the catalog has no titles unless a `{category}.item.json` is put beside the index;
tasks that need titles then raise MissingTitlesError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from sid.data.errors import BadRowReport, DataError, EmptyHistoryError, FieldValueError
from sid.data.minionerec import Catalog, Interaction, check_item, load_catalog, read_json_object

Split = Literal["train", "valid", "test"]


def leave_one_out(user: str, seq: list[int], catalog: Catalog, split: Split, max_history: int) -> list[Interaction]:
    """The `split` rows of one user's sequence (see the module docstring); needs at least 3 items."""
    n = len(seq)
    if split == "train":
        targets = range(1, n - 2)
    elif split == "valid":
        targets = range(n - 2, n - 1)
    else:
        targets = range(n - 1, n)
    titles = catalog.titles
    rows = []
    for t in targets:
        hist = seq[max(0, t - max_history) : t]
        rows.append(
            Interaction(
                user_id=user,
                history_ids=tuple(hist),
                history_sids=tuple(catalog.sids[i] for i in hist),
                history_titles=tuple(titles[i] for i in hist) if titles else None,
                target_id=seq[t],
                target_sid=catalog.sids[seq[t]],
                target_title=titles.get(seq[t]) if titles else None,
            )
        )
    return rows


def read_letter(
    directory: Path,
    category: str,
    split: Split,
    *,
    max_history: int = 20,
    max_users: int = 0,
    bad_rows: BadRowReport | None = None,
) -> tuple[list[Interaction], Catalog]:
    """The `split` rows of a LETTER dataset and its catalog; only the first `max_users` good users of the file
    when it is positive (the same users in every split).

    A bad user entry (not a list of known item ids, or fewer than 3 items so valid has no history) raises, or is
    counted in `bad_rows` and left out of every split when skipping.
    """
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if max_users < 0:
        raise ValueError(f"max_users must be >= 0, got {max_users}")
    bad_rows = bad_rows if bad_rows is not None else BadRowReport()
    catalog = load_catalog(directory, category)
    path = directory / f"{category}.inter.json"
    if not path.is_file():
        raise FileNotFoundError(f"interaction file {path} not found (data.dir / data.category)")
    before = bad_rows.total
    rows: list[Interaction] = []
    users = 0
    for user, seq, line in read_json_object(path):
        if users == max_users > 0:
            break
        try:
            if not isinstance(seq, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in seq):
                raise FieldValueError(path, line, user, f"expected a list of item ids, got {str(seq)[:80]}")
            if len(seq) < 3:
                raise EmptyHistoryError(path, line, user, f"{len(seq)} items: leave-one-out needs at least 3")
            for i in seq:
                check_item(path, line, catalog, i, user)
        except DataError as e:
            bad_rows.handle(e)
            continue
        rows.extend(leave_one_out(user, seq, catalog, split, max_history))
        users += 1
    bad_rows.warn_if_skipped(path, before)
    return rows, catalog
