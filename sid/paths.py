"""One place that locates data: the data root (config, then $SID_DATA_ROOT, then ../shared/data)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_DATA_ROOT = "../shared/data"


def data_root(configured: str = "") -> Path:
    """The data root: the configured value, else $SID_DATA_ROOT, else ../shared/data."""
    return Path(configured or os.environ.get("SID_DATA_ROOT") or DEFAULT_DATA_ROOT).expanduser()


def resolve(path: str | Path, root: str = "") -> Path:
    """Absolute paths and paths starting with ./ or ../ are taken as given; others are under the data root."""
    p = Path(path).expanduser()
    if p.is_absolute() or str(path).startswith(("./", "../")):
        return p
    return data_root(root) / p
