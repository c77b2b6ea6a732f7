"""The built SIDs as a dataset directory the readers take as is.

- `{category}.index.json`: item id -> SID tokens `["<a_12>", "<b_200>", ...]` (level letters a, b, c, ...);
- LETTER: `{category}.inter.json` copied beside it;
- MiniOneRec: `{category}.item.json` copied, `info.txt` (SID, title, item id) and every split CSV with its
  `history_item_sid` / `item_sid` columns rewritten from the item ids (all other columns unchanged).

Every file is written atomically (a temp file, then a rename), so a crash never leaves a half-written one.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sid.data.errors import BadRowReport, FieldValueError
from sid.data.minionerec import CSV_COLUMNS, LEVELS, iter_csv, read_item_json


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def sid_tokens(codes: np.ndarray) -> list[list[str]]:
    """Per item row, its SID tokens `<a_12>`, `<b_200>`, ... (level l gets letter l of the alphabet)."""
    if codes.shape[1] > len(LEVELS):
        raise ValueError(f"{codes.shape[1]} levels, but SID tokens have letters for {len(LEVELS)}")
    return [[f"<{LEVELS[level]}_{int(c)}>" for level, c in enumerate(row)] for row in codes.tolist()]


def write_index(out_dir: Path, category: str, item_ids: Sequence[int], codes: np.ndarray) -> dict[int, str]:
    """Write `{category}.index.json` (items in ascending id order); returns item id -> SID string."""
    tokens = sid_tokens(codes)
    index = {str(item): t for item, t in zip(item_ids, tokens, strict=True)}
    write_atomic(out_dir / f"{category}.index.json", json.dumps(index).encode("utf-8"))
    return {item: "".join(t) for item, t in zip(item_ids, tokens, strict=True)}


def copy_file(src: Path, out_dir: Path) -> None:
    """Copy `src` into `out_dir` atomically (refusing to copy a file onto itself)."""
    dst = out_dir / src.name
    if dst.resolve() == src.resolve():
        raise ValueError(f"output.dir must differ from the data directory ({src.parent})")
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def write_info(out_dir: Path, item_json: Path, sids: dict[int, str]) -> None:
    """`info.txt`: SID, title and item id per item, tab-separated, in item id order."""
    titles, _ = read_item_json(item_json)
    lines = [f"{sids[item]}\t{titles[item]}\t{item}\n" for item in sorted(sids) if item in titles]
    write_atomic(out_dir / "info.txt", "".join(lines).encode("utf-8"))


def rewrite_csv(src: Path, dst: Path, sids: dict[int, str]) -> int:
    """Copy a split CSV with its SID columns recomputed from its item id columns; returns the rows written."""
    rows = []
    header = None
    for line, row in iter_csv(src, BadRowReport(on_bad_row="error")):
        header = header or list(row)
        try:
            history = ast.literal_eval(row["history_item_id"])
            target = int(row["item_id"])
            row["history_item_sid"] = str([sids[int(i)] for i in history])
            row["item_sid"] = sids[target]
        except (ValueError, SyntaxError, TypeError, KeyError) as e:
            raise FieldValueError(src, line, "history_item_id/item_id", f"cannot map to an SID: {e!r}") from e
        rows.append(row)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header or list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(dst, buf.getvalue().encode("utf-8"))
    return len(rows)
