"""Configs: every section is a frozen dataclass in a `config.py`, a package's own in that package (sid/data,
sid/models, sid/optim, sid/eval, sid/index, sid/rl) and the sections of no package (train, mesh, W&B, sampling)
here; sid/jobs.py composes them into each entry point's job. This module also loads them: YAML presets validated
strictly into the dataclasses, then overridden by tyro flags.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from sid.errors import ConfigError, UserError

__all__ = [
    "ConfigError",
    "MeshConfig",
    "SampleConfig",
    "TrainConfig",
    "WandbConfig",
    "cli",
    "dump_yaml",
    "from_dict",
    "load_yaml",
    "run_cli",
    "to_dict",
]

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


# The top-level sections of the jobs (sid/jobs.py): those of no package (a package's own are in its config.py).


@dataclass(frozen=True)
class TrainConfig:
    """The training run. Effective batch = per_device_batch_size × devices × grad_accum_steps rows."""

    output_dir: str = "runs/sft"
    """Run directory: config_resolved.yaml, train.log, run_summary.json, checkpoints/."""
    seed: int = 0
    """Seed for data order, dropout and from-scratch init."""
    per_device_batch_size: int = 8
    """Rows per device per micro-batch."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated (in f32, inside one jitted step) per optimizer step."""
    gather_params_once: bool = False
    """Under fsdp: gather the f32 params once per step and let each device accumulate its own rows' whole gradient,
    reduced over fsdp once per step, instead of gathering weights for every micro-batch's forward and backward and
    reduce-scattering every micro-batch's gradients. Cuts fsdp traffic about grad_accum_steps-fold (measured:
    docs/benchmarks.md); costs every device a whole f32 copy of the params, a whole f32 gradient accumulator and one
    micro-batch's whole gradients (12 bytes per param beyond FSDP's shards), so it suits models that fit that way.
    Same step up to float order."""
    epochs: float = 1.0
    """Passes over the training data (ignored when max_steps > 0)."""
    max_steps: int = 0
    """Optimizer steps; 0 means from epochs."""
    learning_rate: float = 3e-4
    """Peak learning rate (Muon's under the Muon optimizers)."""
    aux_learning_rate: float = 3e-4
    """Peak learning rate of the AdamW branch under Muon (embeddings, head, norms, biases)."""
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay after warmup."""
    warmup_steps: int = 0
    """Linear warmup steps; the first update's learning rate is peak/(warmup+1), never 0."""
    min_lr_ratio: float = 0.0
    """Final learning rate as a fraction of the peak."""
    clip_norm: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    log_every: int = 10
    """Steps between log lines / W&B points."""
    eval_loss_every: int = 0
    """Steps between held-out loss estimates (0: never)."""
    eval_loss_batches: int = 20
    """Batches per held-out loss estimate."""
    valid_rank_every: int = 0
    """Steps between ranking a fixed valid subset with the constrained beam search (HR/NDCG@K; 0: never). Both
    held-out evaluations also run after the last step."""
    valid_rank_samples: int = 1000
    """Valid prompts ranked each time: a fixed, seeded subset (0: the whole valid split)."""
    eval_at_start: bool = False
    """Also run the held-out evaluations on the starting model, logged as step 0. With select_by it competes, so a
    run that never beats where it started (an RL run that does not improve its SFT model) hands that model on."""
    select_by: Literal["none", "ndcg@10", "hr@10", "loss"] = "none"
    """Keep the best checkpoint by valid NDCG@10 / HR@10 (needs valid_rank_every) or held-out loss (needs
    eval_loss_every), apart from the rolling ones, in output_dir/best."""
    early_stop_patience: int = 0
    """Stop after this many evaluations of select_by in a row without a new best (0: never)."""
    final_model: Literal["best", "last"] = "best"
    """Which model the test eval and the HF export use when select_by picks one."""
    label_smoothing: float = 0.0
    """SFT loss: weight of the uniform distribution over the real vocabulary mixed into each target."""
    save_every: int = 0
    """Steps between checkpoints (0: only the last)."""
    save_last: bool = True
    """Checkpoint at the end of training."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk."""
    resume: bool = False
    """Continue from the newest checkpoint in output_dir/checkpoints."""
    progress_bar: bool = True
    """Show a tqdm progress bar (loss, lr, tokens/s, MFU, ETA)."""


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh. 0 means auto: fsdp over the local devices (divided by tp) and dp over hosts."""

    dp: int = 0
    """Data-parallel replicas."""
    fsdp: int = 0
    """Fully-sharded data-parallel axis (params and optimizer state sharded on their large dimension)."""
    tp: int = 1
    """Tensor-parallel axis (attention heads and MLP width)."""
    distributed: bool = False
    """Call jax.distributed.initialize() first (multi-host runs). On TPU pod slices, SLURM, Open MPI and
    Kubernetes JAX finds the settings below by itself; elsewhere set them (one process per host)."""
    coordinator_address: str = ""
    """host:port of process 0's coordinator ("" = auto-detect)."""
    num_processes: int = 0
    """How many processes take part (0 = auto-detect)."""
    process_id: int = -1
    """This process's index in [0, num_processes) (-1 = auto-detect)."""


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases logging. The API key comes from the environment or a .env file, never a config."""

    mode: Literal["online", "offline", "disabled"] = "disabled"
    """online, offline (sync later), or disabled."""
    project: str = "sid"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team); None: the key's default."""
    name: str | None = None
    """Run name; None: the run directory's name."""
    tags: tuple[str, ...] = ()
    """Run tags."""
    init_timeout_s: float = 30.0
    """Seconds W&B may take to start (online: to log in and reach the server) before the run goes on without it."""


@dataclass(frozen=True)
class SampleConfig:
    """Text sampled from the best checkpoint."""

    num_samples: int = 1
    """How many samples."""
    max_new_tokens: int = 500
    """Characters per sample."""
    temperature: float = 0.8
    """Softmax temperature."""
    top_k: int = 200
    """Sample among the k most likely tokens (0: all)."""
    prompt: str = "\n"
    """Start text."""
