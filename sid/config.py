"""Config loading: YAML presets validated strictly into frozen dataclasses, then overridden by tyro flags.

A preset is the base; any field can be overridden on the command line:

    python -m sid.train --config configs/train/cpu/smoke.yaml --train.learning-rate 1e-3

Unknown keys, wrong types and bad enum values raise :class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from sid.errors import ConfigError, UserError

__all__ = ["ConfigError", "cli", "dump_yaml", "from_dict", "load_yaml", "run_cli", "to_dict"]

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists → tuples, ints → floats)."""
    origin = get_origin(tp)

    def fail(why: str) -> ConfigError:
        return ConfigError(f"{source}: key '{key}': {why}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise fail(f"expected a mapping for section {tp.__name__}, got {type(value).__name__}")
        return from_dict(tp, value, source=source, prefix=key + ".")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise fail(f"{value!r} is not one of {', '.join(repr(c) for c in choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(get_args(tp), value, key, source, fail)
    if origin is tuple:
        return _convert_tuple(get_args(tp), value, key, source, fail)
    if tp in (bool, int, float, str):
        return _convert_scalar(tp, value, fail)
    raise fail(f"unsupported annotation {tp!r}")


def _convert_union(options: tuple, value: Any, key: str, source: str, fail: Callable[[str], ConfigError]) -> Any:
    """`value` as the first of `options` it fits (None only where the union allows it)."""
    if value is None:
        if type(None) in options:
            return None
        raise fail("null is not allowed here")
    for option in options:
        if option is type(None):
            continue
        try:
            return _convert(option, value, key, source)
        except ConfigError:
            pass
    raise fail(f"{value!r} matches none of {' | '.join(_type_name(o) for o in options)}")


def _convert_tuple(args: tuple, value: Any, key: str, source: str, fail: Callable[[str], ConfigError]) -> tuple:
    """A YAML list as `tuple[X, ...]` (any length) or `tuple[X, Y]` (exactly that many items), item by item."""
    if not isinstance(value, (list, tuple)):
        raise fail(f"expected a list, got {type(value).__name__} {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_convert(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value))
    if len(args) != len(value):
        raise fail(f"expected {len(args)} items, got {len(value)}")
    return tuple(_convert(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value, strict=True)))


def _convert_scalar(tp: type, value: Any, fail: Callable[[str], ConfigError]) -> Any:
    """`value` as a bool, int, float or str; YAML's true/false never pass for numbers."""
    if tp is float and isinstance(value, str):
        # YAML reads `1e-3` (no dot) as a string; accept numeric strings for floats only.
        try:
            return float(value)
        except ValueError:
            raise fail(f"expected a number, got {value!r}") from None
    if tp is bool:
        ok, what = isinstance(value, bool), "true/false"
    elif tp is int:
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif tp is float:
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, what = isinstance(value, str), "a string"
    if not ok:
        raise fail(f"expected {what}, got {type(value).__name__} {value!r}")
    return float(value) if tp is float else value


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass `cls` from a nested mapping; missing keys keep their defaults."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}' (known keys in this section: {', '.join(fields)})"
        )
    kwargs = {name: _convert(hints[name], value, prefix + name, source) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: section '{prefix.rstrip('.') or cls.__name__}': {e}") from e


def load_yaml(cls: type[T], path: str | Path) -> T:
    """Load a YAML preset into `cls`, rejecting unknown keys, wrong types and bad enum values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return from_dict(cls, data, source=str(path))


def to_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass as plain YAML/JSON-ready data (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def cli(cls: type[T], *, args: list[str] | None = None, description: str | None = None) -> T:
    """Parse `--config PRESET.yaml` (optional, the base) then every dataclass field as a flag (tyro).

    `--help` lists every field with the help text of its docstring.
    """
    import tyro

    argv = list(sys.argv[1:] if args is None else args)
    base = cls()
    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
            del argv[i : i + 2]
            break
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
            del argv[i]
            break
    if config_path is not None:
        base = load_yaml(cls, config_path)
    doc = (description or (cls.__doc__ or "")).strip()
    doc += "\n\nStart from a YAML preset with --config PATH; every flag below overrides it."
    return tyro.cli(cls, default=base, args=argv, description=doc)


def run_cli(cls: type[T], run: Callable[[T], object], argv: list[str] | None = None) -> int:
    """An entry point's body: parse the job, run it. Errors of the user's input (a bad config, a bad data row, a
    missing file), a non-finite loss and a checkpoint that cannot be written end the process with one clear line
    (exit status: the error's `exit_code`) instead of a traceback."""
    try:
        run(cli(cls, args=argv))
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    return 0
