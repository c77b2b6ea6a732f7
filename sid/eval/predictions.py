"""Predictions on disk in MiniOneRec's calc.py schema, and predicted SIDs explained as catalog items.

The file is a JSON list with one record per sample, in split order, with exactly two keys:
``[{"output": target_sid, "predict": [sid_1, ..., sid_K]}, ...]`` (best first), so upstream's calc.py scores it
unchanged. Reading also accepts upstream's own result files (extra keys, ``output`` as a one-element list, quoted
or newline-terminated strings), cleaned the way calc.py cleans them.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from sid.atomic import write_text


def write_predictions(path: str | Path, targets: Sequence[str], predictions: Sequence[Sequence[str]]) -> None:
    """Write ``[{"output": target, "predict": [...]}]`` to ``path`` (UTF-8, parent directories created), atomically:
    a kill or a full disk mid-write leaves the previous file."""
    if len(targets) != len(predictions):
        raise ValueError(f"{len(predictions)} prediction lists for {len(targets)} targets")
    records = [{"output": t, "predict": list(p)} for t, p in zip(targets, predictions, strict=True)]
    write_text(path, json.dumps(records, indent=1, ensure_ascii=False) + "\n")


def write_explained(
    path: str | Path,
    targets: Sequence[str],
    predictions: Sequence[Sequence[str]],
    items_by_sid: Mapping[str, Sequence[Hashable]],
    titles: Mapping[Hashable, str],
    top: int,
) -> None:
    """One JSON line per sample, ``{"target", "top": explain(its first `top` predictions)}``, written atomically."""
    lines = [
        json.dumps({"target": t, "top": explain(p[:top], items_by_sid, titles)}) + "\n"
        for t, p in zip(targets, predictions, strict=True)
    ]
    write_text(path, "".join(lines))


def read_predictions(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """(targets, predictions) from a calc.py-schema file. Strings are cleaned exactly as calc.py cleans them: a string
    target with ``strip(' \\n"')``, a list target's first element with ``strip('"').strip(' ')``, each prediction
    with ``strip('"\\n').strip()``.
    Raises ValueError naming the record when the schema does not hold."""
    records = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    targets, predictions = [], []
    for i, record in enumerate(records):
        where = f"{path}: record {i}"
        if not isinstance(record, dict) or "output" not in record or "predict" not in record:
            raise ValueError(f"{where}: expected an object with keys 'output' and 'predict'")
        output, predict = record["output"], record["predict"]
        if isinstance(output, list) and output and isinstance(output[0], str):
            output = output[0].strip('"').strip(" ")
        elif isinstance(output, str):
            output = output.strip(' \n"')
        else:
            raise ValueError(f"{where}: 'output' must be a SID string, got {output!r}")
        if not isinstance(predict, list) or not all(isinstance(p, str) for p in predict):
            raise ValueError(f"{where}: 'predict' must be a list of SID strings")
        targets.append(output)
        predictions.append([p.strip('"\n').strip() for p in predict])
    return targets, predictions


def explain(
    predict: Sequence[str], items_by_sid: Mapping[str, Sequence[Hashable]], titles: Mapping[Hashable, str]
) -> list[dict]:
    """One sample's ranked predictions as catalog items: ``[{"rank", "sid", "item_ids", "titles"}]`` (rank from 1).

    ``items_by_sid`` maps a SID to every item that carries it (``Catalog.items_by_sid`` or
    ``SidTrie.items_by_sid()``), so a SID shared by several items lists them all; ``titles`` maps item id -> title
    (items without one, e.g. LETTER, get ""). A SID that is no catalog SID gets empty lists.
    """
    out = []
    for rank, sid in enumerate(predict, start=1):
        items = list(items_by_sid.get(sid, ()))
        out.append({"rank": rank, "sid": sid, "item_ids": items, "titles": [titles.get(i, "") for i in items]})
    return out
