"""The run directory: resolved config, log file, run_summary.json; plus .env secrets loading.

Only process 0 writes (multi-host runs share a filesystem or each host keeps its own copy of nothing).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from sid.atomic import write_text
from sid.config import ConfigError, dump_yaml, to_dict

log = logging.getLogger("sid")

_VERSIONED = (
    "jax",
    "jaxlib",
    "equinox",
    "optax",
    "grain",
    "orbax-checkpoint",
    "tokenizers",
    "safetensors",
    "tyro",
    "numpy",
)


def is_main_process() -> bool:
    """True on process 0 (or when jax is not initialised for several processes)."""
    import jax

    return jax.process_index() == 0


def load_dotenv(paths: list[Path] | None = None) -> list[str]:
    """Set variables from .env files (repo root, then ~/.env) without overriding ones already set.

    Returns the names that were set (never the values: secrets must not reach logs or summaries).
    """
    if paths is None:
        paths = [Path(__file__).resolve().parent.parent / ".env", Path.home() / ".env"]
    set_names = []
    for path in paths:
        if not path.is_file():
            continue
        for raw in path.read_text().splitlines():
            line = raw.strip().removeprefix("export ").strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            name, value = (s.strip() for s in line.split("=", 1))
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            if name and name not in os.environ:
                os.environ[name] = value
                set_names.append(name)
    return set_names


def git_sha() -> str | None:
    """The source tree's commit (with '-dirty' when it has uncommitted changes), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide numerics and APIs."""
    out = {"python": sys.version.split()[0]}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class RunDir:
    """A run directory. Creating it writes config_resolved.yaml and starts the log file."""

    def __init__(self, path: str | Path, config: Any, *, log_name: str = "train.log"):
        self.path = Path(path)
        self.config = config
        self.summary: dict[str, Any] = {}
        self.main = is_main_process()
        if self.main:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                dump_yaml(config, self.path / "config_resolved.yaml")
            except OSError as e:
                raise ConfigError(f"{self.path}: cannot write the run directory here: {e.strerror or e}") from e
        setup_logging(self.path / log_name if self.main else None)
        self.summary.update(config=to_dict(config), git_sha=git_sha(), versions=package_versions())

    def update(self, **sections: Any) -> None:
        """Merge sections into run_summary.json and rewrite it (so a crashed run keeps what it had)."""
        self.summary.update(sections)
        self.write_summary()

    def write_summary(self) -> None:
        if self.main:
            write_text(self.path / "run_summary.json", strict_json(self.summary, indent=2))

    def append_metrics(self, record: dict[str, Any], name: str = "metrics.jsonl") -> None:
        """One JSON line per logged step (the loss curve that reports plot)."""
        if self.main:
            with open(self.path / name, "a") as f:
                f.write(strict_json(record) + "\n")

    def truncate_metrics(self, step: int, name: str = "metrics.jsonl") -> None:
        """Drop the records of steps after `step`: a run resumed from checkpoint `step` logs them again, and a
        reader must see each step once. A torn last line (a kill mid-append) goes too."""
        path = self.path / name
        if not self.main or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= step:
                kept.append(line + "\n")
        write_text(path, "".join(kept))


def strict_json(obj: Any, **kw: Any) -> str:
    """JSON that strict readers accept: NaN and Inf become null (and numpy/jax scalars plain numbers)."""
    return json.dumps(_finite(obj), allow_nan=False, default=lambda x: _finite(_jsonable(x)), **kw)


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def setup_logging(log_file: Path | None) -> None:
    """Log INFO to stderr and, on the main process, to `log_file` (appending across resumes). Other processes of
    a multi-process run log only warnings and errors, tagged with their index, so a pod prints one log."""
    import jax

    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    if not is_main_process():
        stream.setLevel(logging.WARNING)
        stream.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s [process {jax.process_index()}] %(message)s", "%H:%M:%S")
        )
    log.addHandler(stream)
    if log_file is not None:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(fmt)
        log.addHandler(fh)


SHARED_MARKER = ".sid_shared_check"
SHARED_WAIT_S = 10.0
"""How long a process looks for process 0's marker (network filesystems may show a new file late)."""


def _sees(marker: Path, token: str) -> bool:
    deadline = time.monotonic() + SHARED_WAIT_S
    while True:
        if marker.is_file() and marker.read_text() == token:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)


def require_shared_directory(path: Path) -> None:
    """Multi-process runs: fail at once, on every process, unless all of them see process 0's `path`.

    Orbax writes one checkpoint from all processes into one directory; a process that cannot see process 0's
    copy (a host-local disk on a pod) would otherwise wait for it forever at the first save. Process 0 writes a
    fresh random token into `path`; each process reads it back; all processes learn who could.
    """
    import jax

    if jax.process_count() == 1:
        return
    import numpy as np
    from jax.experimental import multihost_utils

    token = str(int(multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(4), np.int32)[0])))
    marker = path / SHARED_MARKER
    if is_main_process():
        marker.write_text(token)
    multihost_utils.sync_global_devices("sid: shared run directory marker written")
    seen = _sees(marker, token)
    # Gathering the answers is also the barrier after every read, so process 0 may then remove the marker.
    everyone = np.asarray(multihost_utils.process_allgather(np.asarray(seen)))
    if is_main_process():
        marker.unlink()
    if not everyone.all():
        blind = [int(i) for i in np.flatnonzero(~everyone)]
        raise ConfigError(
            f"{path}: process(es) {blind} of {jax.process_count()} do not see process 0's run directory, so "
            "checkpoints cannot be written; put --train.output-dir on a filesystem every host mounts "
            "(NFS, a GCS FUSE mount) at the same path"
        )
