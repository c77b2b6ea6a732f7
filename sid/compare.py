"""The A/B report of two runs: final loss, HR@K / NDCG@K, step time and tokens/s side by side with deltas, the
config keys that differ, and both loss curves.

    python -m sid.compare RUN_A RUN_B --out DIR [--label-a A --label-b B] [--train-config YAML --eval-config YAML]

A run is a run directory (or its run_summary.json): `run_summary.json` gives the train section (and an eval
section when training evaluated), `eval/run_summary.json` (written by `sid.eval --output-dir RUN/eval`) gives the
eval section and takes precedence, `metrics.jsonl` gives the loss curve. A missing file or section (a failed
run) is reported as such and the other column is still shown. Writes DIR/report.md and DIR/loss.png.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sid.atomic import write_text

SUMMARY = "run_summary.json"
EVAL_SUMMARY = Path("eval") / SUMMARY
METRICS = "metrics.jsonl"
# Keys that name the run rather than configure it; they always differ between A and B.
RUN_SPECIFIC_KEYS = frozenset(
    {"config.train.output_dir", "config.eval.checkpoint", "config.output_dir", "config.wandb.name"}
)


@dataclass(frozen=True)
class Curve:
    """Loss points of one run from metrics.jsonl: training loss per logged step, held-out loss where measured."""

    steps: tuple[int, ...] = ()
    loss: tuple[float, ...] = ()
    eval_steps: tuple[int, ...] = ()
    eval_loss: tuple[float, ...] = ()
    skipped_lines: int = 0
    """Lines that were not JSON objects (a run killed mid-write leaves a partial last line)."""

    def best_eval(self) -> tuple[float | None, float | None]:
        """(lowest held-out loss, its step), or (None, None) without held-out points."""
        if not self.eval_loss:
            return None, None
        i = min(range(len(self.eval_loss)), key=self.eval_loss.__getitem__)
        return self.eval_loss[i], float(self.eval_steps[i])


@dataclass(frozen=True)
class RunResult:
    """What a run directory holds; `problems` says, in words, what is missing."""

    path: Path
    summary: dict[str, Any] | None
    train: dict[str, Any] | None
    eval: dict[str, Any] | None
    eval_source: Path | None
    eval_config: dict[str, Any] | None
    curve: Curve
    problems: tuple[str, ...] = field(default=())


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{path.name} unreadable ({e})"
    if not isinstance(data, dict):
        return None, f"{path.name} is not a JSON object"
    return data, None


def load_curve(path: Path) -> Curve:
    """Training loss (records with `loss`) and held-out loss (records with `eval_loss`) from metrics.jsonl."""
    steps, loss, eval_steps, eval_loss, skipped = [], [], [], [], 0
    if not path.is_file():
        return Curve()
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if not isinstance(record, dict) or "step" not in record:
            skipped += 1
            continue
        if isinstance(record.get("loss"), (int, float)):
            steps.append(int(record["step"]))
            loss.append(float(record["loss"]))
        if isinstance(record.get("eval_loss"), (int, float)):
            eval_steps.append(int(record["step"]))
            eval_loss.append(float(record["eval_loss"]))
    return Curve(tuple(steps), tuple(loss), tuple(eval_steps), tuple(eval_loss), skipped)


def load_run(path: str | Path) -> RunResult:
    """Read a run directory (or the path of its run_summary.json); never raises for missing or broken files."""
    path = Path(path)
    if path.name == SUMMARY and not path.is_dir():
        path = path.parent
    problems: list[str] = []
    if not path.is_dir():
        return RunResult(path, None, None, None, None, None, Curve(), (f"run directory {path} not found",))
    summary, why = _read_json(path / SUMMARY)
    if why:
        problems.append(f"{why}: the run did not start or wrote nothing")
    summary = summary or {}
    train = summary.get("train") if isinstance(summary.get("train"), dict) else None
    if summary and train is None:
        problems.append("train section absent from run_summary.json: training failed or did not finish")
    eval_summary, _ = _read_json(path / EVAL_SUMMARY)
    eval_section, eval_source, eval_config = None, None, None
    if eval_summary is not None and isinstance(eval_summary.get("eval"), dict):
        eval_section, eval_source = eval_summary["eval"], path / EVAL_SUMMARY
        eval_config = eval_summary.get("config") if isinstance(eval_summary.get("config"), dict) else None
    elif isinstance(summary.get("eval"), dict):
        eval_section, eval_source = summary["eval"], path / SUMMARY
    else:
        problems.append(
            f"eval section absent (neither {EVAL_SUMMARY} nor {SUMMARY} has one): evaluation failed or was not run"
        )
    curve = load_curve(path / METRICS)
    if not curve.steps:
        problems.append(f"no training loss in {METRICS}")
    if curve.skipped_lines:
        problems.append(f"{curve.skipped_lines} unreadable line(s) in {METRICS} skipped")
    return RunResult(path, summary or None, train, eval_section, eval_source, eval_config, curve, tuple(problems))


@dataclass(frozen=True)
class Row:
    """One metric of the table: its value in A and B (None when absent) and how to print it."""

    name: str
    a: float | None
    b: float | None
    spec: str = ".4f"
    """Format spec of the (scaled) value; the delta adds a sign."""
    scale: float = 1.0
    """Printed value = value x scale (seconds to milliseconds)."""

    @property
    def delta(self) -> float | None:
        """B − A, when both exist."""
        return None if self.a is None or self.b is None else self.b - self.a

    @property
    def relative(self) -> float | None:
        """(B − A) / |A| in percent, when both exist and A ≠ 0."""
        d = self.delta
        return None if d is None or not self.a else 100.0 * d / abs(self.a)

    def cells(self) -> list[str]:
        """name, A, B, Δ, Δ% as printed; an absent value is '—'."""

        def show(x: float | None, sign: str = "") -> str:
            return "—" if x is None else format(x * self.scale, sign + self.spec)

        rel = "—" if self.relative is None else f"{self.relative:+.1f}%"
        return [self.name, show(self.a), show(self.b), show(self.delta, "+"), rel]


def _number(value: Any, *keys: str) -> float | None:
    """value[k1][k2]... as a finite float, or None when any level is missing or not a number."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key, value.get(int(key)) if key.isdigit() else None)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _ks(*sections: dict[str, Any] | None) -> list[str]:
    """The K values of HR@K / NDCG@K present in any section, in numeric order."""
    keys = set()
    for section in sections:
        for metric in ("hr", "ndcg"):
            table = (section or {}).get(metric)
            if isinstance(table, dict):
                keys.update(str(k) for k in table)
    return sorted(keys, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def metric_rows(a: RunResult, b: RunResult) -> list[Row]:
    """The table's rows, in order: training, ranking quality per K, speed, then bookkeeping that must match.
    Rows that neither run has are left out."""

    def train(name: str, key: str, **fmt: Any) -> Row:
        return Row(name, _number(a.train, key), _number(b.train, key), **fmt)

    def evals(name: str, *keys: str, **fmt: Any) -> Row:
        return Row(name, _number(a.eval, *keys), _number(b.eval, *keys), **fmt)

    (best_a, at_a), (best_b, at_b) = a.curve.best_eval(), b.curve.best_eval()
    ks = _ks(a.eval, b.eval)
    rows = [
        train("final loss", "final_loss"),
        Row("best held-out loss", best_a, best_b),
        Row("step of best held-out loss", at_a, at_b, spec=",.0f"),
        *(evals(f"HR@{k}", "hr", k) for k in ks),
        *(evals(f"NDCG@{k}", "ndcg", k) for k in ks),
        train("step time (ms)", "step_time_s", spec=".1f", scale=1000.0),
        train("tokens/s", "tokens_per_s", spec=",.0f"),
        train("optimizer steps", "steps", spec=",.0f"),
        train("effective batch (rows)", "effective_batch_size", spec=",.0f"),
        train("train wall time (s)", "wall_s", spec=".1f"),
        train("compile time (s)", "compile_s", spec=".1f"),
        train("step memory per device (MiB)", "step_memory_bytes", spec=",.1f", scale=1 / 2**20),
        evals("eval samples", "n_samples", spec=",.0f"),
        evals("eval beams", "n_beams", spec=",.0f"),
        evals("invalid predictions", "invalid_prediction_count", spec=",.0f"),
    ]
    return [row for row in rows if row.a is not None or row.b is not None]


def format_row(row: Row) -> str:
    """One markdown table line: | name | A | B | Δ | Δ% |."""
    return "| " + " | ".join(row.cells()) + " |"


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def config_differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[tuple[str, Any, Any]]:
    """(key, A's value, B's value) for every flattened key whose values differ, run-specific keys excluded.

    A key missing on one side reads as '(absent)'."""
    fa, fb = _flatten(a or {}), _flatten(b or {})
    out = []
    for key in sorted(fa.keys() | fb.keys()):
        if key in RUN_SPECIFIC_KEYS:
            continue
        va, vb = fa.get(key, "(absent)"), fb.get(key, "(absent)")
        if va != vb:
            out.append((key, va, vb))
    return out


def _setup(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parts of a train summary that define the experiment (not its results)."""
    if summary is None:
        return None
    return {k: summary[k] for k in ("config", "token_extension", "vocab_resize") if k in summary}


def _cell(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def plot_losses(curves: dict[str, Curve], path: Path) -> bool:
    """Both runs' training loss (lines) and held-out loss (markers) against step, to a PNG. False: nothing to plot."""
    if not any(c.steps or c.eval_steps for c in curves.values()):
        return False
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(fig)  # the Agg (file-only) canvas: no display, no global pyplot state
    ax = fig.add_subplot()
    for (label, curve), color in zip(curves.items(), ("tab:blue", "tab:orange"), strict=False):
        if curve.steps:
            ax.plot(curve.steps, curve.loss, color=color, linewidth=1.2, label=f"{label} train")
        if curve.eval_steps:
            ax.plot(
                curve.eval_steps,
                curve.eval_loss,
                color=color,
                linestyle="--",
                marker="o",
                markersize=3,
                label=f"{label} held-out",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(v > 0 for c in curves.values() for v in (*c.loss, *c.eval_loss)):
        ax.set_yscale("log")  # the late, small differences between A and B are what matter
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def render_report(
    a: RunResult,
    b: RunResult,
    *,
    label_a: str,
    label_b: str,
    configs: dict[str, str | None],
    plot: str | None,
) -> str:
    """The markdown report. `configs` maps train_a/train_b/eval_a/eval_b to preset paths (None: not given)."""
    lines = [f"# A/B comparison: A = {label_a}, B = {label_b}", ""]
    lines += _runs_section(a, b, label_a, label_b, configs)
    problems = [(label, p) for label, r in (("A", a), ("B", b)) for p in r.problems]
    if problems:
        lines += ["## Missing or partial results", ""]
        lines += [f"- **{label}**: {p}" for label, p in problems]
        lines.append("")
    lines += [
        "## Metrics",
        "",
        "Δ = B − A; Δ% relative to A. Step time and tokens/s exclude the first (compiling) step.",
        "",
        "| metric | A | B | Δ (B−A) | Δ% |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = metric_rows(a, b)
    lines += [format_row(row) for row in rows] if rows else ["| (no metrics in either run) | | | | |"]
    lines.append("")
    lines += ["## Loss curves", ""]
    lines += [f"![loss curves]({plot})" if plot else "No loss curve in either run's metrics.jsonl.", ""]
    return "\n".join(lines + _config_section(a, b) + _versions_section(a, b))


def _runs_section(a: RunResult, b: RunResult, label_a: str, label_b: str, configs: dict[str, str | None]) -> list:
    """The table of what is compared: labels, run directories, git shas, presets, where the eval numbers come from."""
    lines = [
        "| | A | B |",
        "|---|---|---|",
        f"| label | {label_a} | {label_b} |",
        f"| run directory | `{a.path}` | `{b.path}` |",
    ]
    sha = [(r.summary or {}).get("git_sha") or "—" for r in (a, b)]
    lines.append(f"| git sha (from run_summary.json) | `{sha[0]}` | `{sha[1]}` |")
    for kind in ("train", "eval"):
        ca, cb = configs.get(f"{kind}_a"), configs.get(f"{kind}_b") or configs.get(f"{kind}_a")
        if ca or cb:
            lines.append(f"| {kind} config | `{ca or '—'}` | `{cb or '—'}` |")
    sources = [f"`{r.eval_source}`" if r.eval_source else "—" for r in (a, b)]
    return lines + [f"| eval numbers from | {sources[0]} | {sources[1]} |", ""]


def _config_section(a: RunResult, b: RunResult) -> list:
    """The train and eval config keys that differ between the runs."""
    lines = ["## Config differences", ""]
    for title, da, db in (
        ("Train (run_summary.json)", _setup(a.summary), _setup(b.summary)),
        ("Eval (eval/run_summary.json)", a.eval_config, b.eval_config),
    ):
        if da is None or db is None:
            has = " and ".join(n for n, d in (("A", da), ("B", db)) if d is not None) or "neither run"
            lines += [f"{title}: not compared; only {has} has one.", ""]
            continue
        diff = config_differences(da, db)
        if not diff:
            lines += [f"{title}: identical (run directory paths aside).", ""]
            continue
        lines += [f"{title}:", "", "| key | A | B |", "|---|---|---|"]
        lines += [f"| {key} | {_cell(va)} | {_cell(vb)} |" for key, va, vb in diff]
        lines.append("")
    return lines


def _versions_section(a: RunResult, b: RunResult) -> list:
    """Package versions side by side, those that differ marked."""
    va, vb = ((r.summary or {}).get("versions") or {} for r in (a, b))
    if not (va or vb):
        return []
    lines = ["## Versions", "", "| package | A | B |", "|---|---|---|"]
    for key in sorted(va.keys() | vb.keys()):
        mark = "" if va.get(key) == vb.get(key) else " ≠"
        lines.append(f"| {key}{mark} | {va.get(key, '—')} | {vb.get(key, '—')} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    """CLI: write OUT/report.md and OUT/loss.png for two run directories."""
    parser = argparse.ArgumentParser(
        prog="python -m sid.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_a", type=Path, help="run directory A (or its run_summary.json)")
    parser.add_argument("run_b", type=Path, help="run directory B (or its run_summary.json)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for report.md and loss.png")
    parser.add_argument("--label-a", help="name of A in the report (default: its directory name)")
    parser.add_argument("--label-b", help="name of B in the report (default: its directory name)")
    parser.add_argument("--train-config", help="train preset both runs used (named in the report)")
    parser.add_argument("--eval-config", help="eval preset both runs used")
    parser.add_argument("--train-config-b", help="train preset of B when it differs from A's")
    parser.add_argument("--eval-config-b", help="eval preset of B when it differs from A's")
    args = parser.parse_args(argv)

    a, b = load_run(args.run_a), load_run(args.run_b)
    label_a = args.label_a or a.path.name
    label_b = args.label_b or b.path.name
    args.out.mkdir(parents=True, exist_ok=True)
    plotted = plot_losses({label_a: a.curve, label_b: b.curve}, args.out / "loss.png")
    if not plotted:
        (args.out / "loss.png").unlink(missing_ok=True)  # never leave an older plot beside a new report
    configs = {
        "train_a": args.train_config,
        "train_b": args.train_config_b,
        "eval_a": args.eval_config,
        "eval_b": args.eval_config_b,
    }
    report = render_report(
        a, b, label_a=label_a, label_b=label_b, configs=configs, plot="loss.png" if plotted else None
    )
    write_text(args.out / "report.md", report)
    for label, run in (("A", a), ("B", b)):
        for problem in run.problems:
            print(f"sid.compare: {label} ({run.path}): {problem}", file=sys.stderr)
    print(f"wrote {args.out / 'report.md'}" + (f" and {args.out / 'loss.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
