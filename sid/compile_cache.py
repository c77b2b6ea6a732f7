"""JAX's persistent compilation cache, on by default for sid's runs: a program is compiled once per machine, so a
re-run, a resume after preemption, or the next seed of a sweep with the same shapes loads it from disk instead.

JAX's own settings win: `JAX_COMPILATION_CACHE_DIR` moves the cache (its size is then JAX's to manage), and
`JAX_ENABLE_COMPILATION_CACHE=false` turns it off. Entries are keyed by the program, the compile options, the
devices and the JAX version, so a changed program never loads a stale one. Only compiles that take at least
`jax_persistent_cache_min_compile_time_secs` (JAX's default: 1 s) are stored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger("sid")

MAX_BYTES = 4 << 30
"""The default cache's size: past it, the least recently used programs are evicted (which also makes concurrent
runs take a file lock around each write, so no run reads a half-written entry)."""


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/sid/jax`, or `~/.cache/sid/jax`."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sid" / "jax"


def enable_compilation_cache() -> Path | None:
    """Point JAX's persistent compilation cache at `default_cache_dir()` (at most MAX_BYTES) unless the user set
    its directory or turned it off; returns the directory in use (None: off). Call before the run's first compile."""
    if not jax.config.jax_enable_compilation_cache:
        return None
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(default_cache_dir()))
        if jax.config.jax_compilation_cache_max_size == -1:
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return Path(jax.config.jax_compilation_cache_dir)
