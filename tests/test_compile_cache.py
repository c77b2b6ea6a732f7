"""sid's persistent compilation cache: on by default in the user's cache directory, where a second process loads
what the first compiled; JAX's own settings (another directory, or off) win. Each case runs in a fresh process,
since JAX reads its cache settings once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sid.compile_cache import MAX_BYTES

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json
import jax, jax.numpy as jnp
from sid.compile_cache import enable_compilation_cache
events = []
jax.monitoring.register_event_listener(lambda event, *args, **kwargs: events.append(event))
cache = enable_compilation_cache()
jax.jit(lambda x: jnp.sin(x) * 2 + 1).lower(jnp.ones(8)).compile()
print(json.dumps({"cache": cache and str(cache), "max_size": jax.config.jax_compilation_cache_max_size,
                  "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def run(tmp_path: Path, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if "COMPILATION_CACHE" not in k}  # conftest turns the cache off
    env = clean | {"JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(tmp_path / "xdg"),
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"} | env  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def entries(path: Path) -> list[Path]:
    return sorted(path.glob("*-cache")) if path.is_dir() else []


def test_default_cache_is_filled_by_one_process_and_read_by_the_next(tmp_path):
    default = tmp_path / "xdg" / "sid" / "jax"
    first = run(tmp_path)
    assert first == {"cache": str(default), "max_size": MAX_BYTES, "hits": 0}
    stored = entries(default)
    assert stored
    second = run(tmp_path)
    assert second["hits"] >= 1 and entries(default) == stored  # loaded, not compiled and stored again


@pytest.mark.parametrize("setting", ["elsewhere", "off"])
def test_jax_settings_win(tmp_path, setting):
    elsewhere = tmp_path / "mine"
    env = {"JAX_COMPILATION_CACHE_DIR": str(elsewhere)} if setting == "elsewhere" else {}
    if setting == "off":
        env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    out = run(tmp_path, **env)
    assert out["cache"] == (str(elsewhere) if setting == "elsewhere" else None)
    assert out["max_size"] == -1  # JAX's own (unbounded) size: sid caps only its default directory
    assert bool(entries(elsewhere)) == (setting == "elsewhere")
    assert not (tmp_path / "xdg").exists()
