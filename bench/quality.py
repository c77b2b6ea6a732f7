"""Recommendation quality: train from scratch with `sid.train`, rank the test split, and print Recall@5/10 and
NDCG@5/10 per seed, their mean and spread, beside the published figures and a popularity baseline (the same 10
most frequent train targets for every user); with --rl, GRPO (`sid.rl`) on top of each SFT run and the test
metrics before and after.

Every run is `python -m sid.train --config PRESET <variant overrides> --train.seed S --model.seed S` in its own
process (up to --parallel at once; on one GPU each gets 0.9/N of its memory), and its figures are read from its
run_summary.json: `eval` (the test metrics) and `train.best` (the checkpoint chosen on valid). With --rl RL_PRESET,
each SFT run that succeeds is followed, in the same queue, by `python -m sid.rl --config RL_PRESET --rl.init
SFT_DIR --train.seed S`. The results JSON is rewritten atomically after each finished run, so a sweep cut short
keeps what it measured.

    python bench/quality.py --mode gpu --variants base:0-2 drop0.2:0 wide:0 --parallel 5
    python bench/quality.py --mode gpu --seeds 0-2 --parallel 3 --rl configs/rl/gpu/letter_instruments.yaml
    python bench/quality.py --mode cpu          # a tiny model on 500 users, on a CPU
    python bench/quality.py --mode tiny         # seconds: the CI check that the bench runs end to end
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python bench/quality.py` from anywhere: bench.common and sid resolve

from bench.common import host_environment, markdown_table, write_json  # noqa: E402

METRICS = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
COMPARED = ("recall@10", "ndcg@10")
"""The metrics of the SFT -> RL before/after tables (issue 25); the results JSON has all of METRICS."""
TARGET = {"recall@10": 0.120, "ndcg@10": 0.088}
"""Issue 24's target on LETTER Instruments (test split, best checkpoint chosen on valid)."""
PUBLISHED_SOURCE = (
    "LETTER paper (Wang et al., 'Learnable Item Tokenization for Generative Recommendation', CIKM 2024, "
    "arXiv 2405.07314), Instruments; figures as cited, rounded ('about'), by sid issue 24 (not re-read from the "
    "paper's table here)"
)
PUBLISHED = {
    "TIGER (published)": {"recall@10": 0.106, "ndcg@10": 0.080},
    "LETTER-TIGER (published)": {"recall@10": 0.112, "ndcg@10": 0.083},
}


@dataclasses.dataclass(frozen=True)
class Mode:
    """A preset and how to read its figures."""

    config: str
    """Train preset (relative to the repository root)."""
    overrides: tuple[str, ...] = ()
    """sid.train flags every run of this mode gets, before the variant's."""
    published: bool = False
    """Whether the published LETTER Instruments figures apply (same data and protocol)."""
    note: str = ""
    """Printed under the table: what the figures are and are not."""
    seeds: str = "0-2"
    """Default --seeds."""

    def variant_flags(self, variant: str) -> list[str]:
        """The variant's sid.train flags; `{data_dir}` becomes this mode's preset's `data.dir`."""
        flags = VARIANTS[variant]
        if not any("{data_dir}" in f for f in flags):
            return list(flags)
        data_dir = yaml.safe_load((ROOT / self.config).read_text())["data"]["dir"]
        return [f.replace("{data_dir}", data_dir) for f in flags]


MODES = {
    "gpu": Mode("configs/train/gpu/letter_instruments.yaml", published=True),
    "industrial": Mode(
        "configs/train/gpu/industrial.yaml",
        note="Industrial trained on train_partial.csv (29% of the published train rows): NOT comparable to any "
        "published figure.",
    ),
    "cpu": Mode(
        "configs/train/cpu/letter_instruments_quality.yaml",
        note="CPU mode: a 2-layer x 64 model, 4 epochs on the first 500 LETTER users, ranked on their 500 test "
        "users: a check that the pipeline learns, not the published protocol. Measured (seed 0, docs/benchmarks.md "
        "section 6): Recall@10 0.026, NDCG@10 0.0153; expect about 0.01-0.04 Recall@10 (500 users: standard "
        "error 0.007). The popularity row above is what item popularity alone gets; this tiny model stays below it.",
        seeds="0",
    ),
    "tiny": Mode(
        "configs/train/cpu/letter_instruments_tiny.yaml",
        overrides=(
            *("--data.max-users", "40", "--train.max-steps", "4", "--eval.max-samples", "16", "--eval.topk", "5", "10"),
            *("--train.valid-rank-every", "2", "--train.valid-rank-samples", "8", "--train.select-by", "ndcg@10"),
            *("--train.final-model", "best"),
        ),
        note="Tiny mode: 4 steps of a 2-layer x 64 model; checks the bench runs end to end, its figures mean nothing.",
        seeds="0",
    ),
}

VARIANTS: dict[str, tuple[str, ...]] = {
    "base": (),
    "drop0": ("--model.attention-dropout", "0", "--model.residual-dropout", "0"),
    "drop0.2": ("--model.attention-dropout", "0.2", "--model.residual-dropout", "0.2"),
    "ls0.1": ("--train.label-smoothing", "0.1"),
    "wd0.1": ("--optimizer.weight-decay", "0.1"),
    "lr1e-3": ("--train.learning-rate", "1e-3"),
    "ep10": ("--train.epochs", "10"),
    "wide": ("--model.hidden-size", "384", "--model.intermediate-size", "1536", "--model.num-heads", "6"),
    "deep": ("--model.num-layers", "6"),
    "built_sids": ("--data.dir", "built_sids/{data_dir}"),
    "built_sids_balanced": ("--data.dir", "built_sids_balanced/{data_dir}"),
}
"""Named override sets (sid.train flags) to sweep; `base` is the preset as it is. `built_sids` reads the SIDs
`sid.index` built for the mode's dataset from `built_sids/<the preset's data.dir>` (issue 26), and
`built_sids_balanced` those built with `--quantizer.balanced` from `built_sids_balanced/<data.dir>`."""


SHARED_SECTIONS = ("--data.", "--tokenizer.", "--tasks.", "--eval.")
"""Flag sections an RL run takes from its SFT run's flags: the same catalog and tokenizer (so its export loads),
and the same test users, beams and cut-offs (so before and after compare). Not train/optimizer/model flags: the
RL preset has its own schedule, and a variant's e.g. `--train.epochs 10` is not meant for it."""


def run_name(variant: str, seed: int, stage: str = "sft") -> str:
    return f"{variant}-s{seed}" + ("-rl" if stage == "rl" else "")


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the sweep: SFT (`sid.train`), or RL (`sid.rl`) from the SFT run directory `init`."""

    variant: str
    seed: int
    out_dir: Path
    init: Path | None = None
    """The SFT run directory an RL run starts from; None for an SFT run."""

    @property
    def stage(self) -> str:
        return "sft" if self.init is None else "rl"

    @property
    def module(self) -> str:
        return "sid.train" if self.init is None else "sid.rl"

    @property
    def name(self) -> str:
        return run_name(self.variant, self.seed, self.stage)

    def follow_up(self) -> Run:
        """The RL run on top of this SFT run, beside it in the sweep directory."""
        return Run(
            self.variant, self.seed, self.out_dir.with_name(run_name(self.variant, self.seed, "rl")), init=self.out_dir
        )

    def command(self, mode: Mode, extra: list[str]) -> list[str]:
        return [
            *(sys.executable, "-m", "sid.train", "--config", str(ROOT / mode.config)),
            *mode.overrides,
            *mode.variant_flags(self.variant),
            *extra,
            *("--train.seed", str(self.seed), "--model.seed", str(self.seed)),
            *("--train.output-dir", str(self.out_dir)),
        ]

    def rl_command(self, preset: str, extra: list[str]) -> list[str]:
        """`sid.rl` from `init`. Only train.seed (prompt order, sampled rollouts' keys, the valid subset: the SFT
        run's for the same seed) is set: the model is loaded from the SFT export, so model.seed has nothing to do."""
        return [
            *(sys.executable, "-m", "sid.rl", "--config", str(ROOT / preset)),
            *extra,
            *("--rl.init", str(self.init), "--train.seed", str(self.seed)),
            *("--train.output-dir", str(self.out_dir)),
        ]


def shared_flags(flags: Sequence[str]) -> list[str]:
    """The flags of SHARED_SECTIONS among sid.train flags, each with its values."""
    out, keep = [], False
    for token in flags:
        if token.startswith("--"):
            keep = token.startswith(SHARED_SECTIONS)
        if keep:
            out.append(token)
    return out


def run_command(run: Run, mode: Mode, args: argparse.Namespace) -> list[str]:
    """An SFT run's sid.train command; an RL run's sid.rl command: its SFT run's shared flags, then --rl-extra."""
    if run.init is None:
        return run.command(mode, args.set)
    shared = shared_flags([*mode.overrides, *mode.variant_flags(run.variant), *args.set])
    return run.rl_command(args.rl, [*shared, *args.rl_extra])


def parse_seeds(text: str) -> list[int]:
    """'0-2' -> [0, 1, 2]; '0,3' -> [0, 3]."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += range(int(lo), int(hi or lo) + 1)
    return seeds


def plan_runs(variants: list[str], seeds: str, sweep_dir: Path) -> list[Run]:
    """Runs in the order given: each `NAME` with --seeds, or `NAME:SEEDS` with its own seeds."""
    runs = []
    for spec in variants:
        name, _, own = spec.partition(":")
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}: expected one of {', '.join(VARIANTS)}")
        try:
            run_seeds = parse_seeds(own or seeds)
        except ValueError:
            raise SystemExit(f"bad seeds {own or seeds!r} in {spec!r}: expected e.g. 0-2 or 0,3") from None
        runs += [Run(name, s, sweep_dir / f"{name}-s{s}") for s in run_seeds]
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise SystemExit(f"a run is listed twice: {', '.join(names)}")
    return runs


def child_env(parallel: int) -> dict[str, str]:
    """The environment of each run: N runs share one accelerator's memory, grown on demand rather than taken at
    start-up (a preallocated 90% would leave the others nothing)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    if parallel > 1:
        env.update(XLA_PYTHON_CLIENT_MEM_FRACTION=f"{0.9 / parallel:.3f}", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    return env


def stop(proc: subprocess.Popen) -> None:
    """End a run and everything it started (its own process group) at once. SIGKILL, not SIGTERM: sid.train takes
    SIGTERM for a preemption and would first write a checkpoint that nobody reads."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def read_run(run: Run, returncode: int | None, wall_s: float) -> dict[str, Any]:
    """One run's record: its test metrics and chosen checkpoint from run_summary.json, or why there are none."""
    record: dict[str, Any] = {"variant": run.variant, "seed": run.seed, "stage": run.stage, "dir": str(run.out_dir)}
    record["wall_s"] = wall_s
    path = run.out_dir / "run_summary.json"
    summary = json.loads(path.read_text()) if path.is_file() else {}
    test = summary.get("eval")
    if returncode is None:
        record["error"] = f"stopped after {wall_s:.0f} s (time limit or interrupt)"
    elif returncode != 0:
        record["error"] = f"{run.module} exited with status {returncode} (see {run.name}.log)"
    elif not test:
        record["error"] = f"{path} has no test metrics (eval section)"
    if test:
        for k in (5, 10):
            record[f"recall@{k}"] = test["hr"].get(str(k))  # one held-out item per user: HR@K is Recall@K
            record[f"ndcg@{k}"] = test["ndcg"].get(str(k))
        record["test_users"] = test.get("n_samples")
    train = summary.get("train", {})
    record["best"] = train.get("best")
    record["steps"] = train.get("final_step")
    record["train_wall_s"] = train.get("wall_s")
    if run.init is not None:
        record["init"] = train.get("init")  # the model directory sid.rl loaded
    return record


def start(run: Run, cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start one run, its output to SWEEP_DIR/NAME.log, in its own process group (so stopping it stops all of it)."""
    run.out_dir.parent.mkdir(parents=True, exist_ok=True)
    print(f"[quality] start {run.name}: {' '.join(cmd[2:])}", flush=True)
    with open(run.out_dir.parent / f"{run.name}.log", "w") as log_file:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )


def finished(running: dict[Run, tuple[subprocess.Popen, float]], time_limit: float) -> list[tuple]:
    """Take out of `running` the runs that ended or ran past `time_limit` (those are stopped): (run, return code,
    or None when stopped, wall seconds) each."""
    done = []
    for run, (proc, t0) in list(running.items()):
        wall = time.monotonic() - t0
        if proc.poll() is None and (not time_limit or wall < time_limit):
            continue
        timed_out = proc.poll() is None
        if timed_out:
            stop(proc)
        del running[run]
        done.append((run, None if timed_out else proc.returncode, wall))
    return done


def sweep(runs: list[Run], mode: Mode, args, on_done) -> None:
    """Run everything, `args.parallel` at a time, each under `args.time_limit`; `on_done(record)` as each ends.
    With `args.rl`, an SFT run that succeeds queues its RL run. SIGTERM (e.g. from `timeout`) stops the runs
    still going, records them, and leaves."""
    env = child_env(args.parallel)
    pending, running = list(runs), {}

    def terminate(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    try:
        while pending or running:
            while pending and len(running) < args.parallel:
                run = pending.pop(0)
                running[run] = (start(run, run_command(run, mode, args), env), time.monotonic())
            time.sleep(0.5)
            for run, returncode, wall in finished(running, args.time_limit):
                record = read_run(run, returncode, wall)
                on_done(record)
                if args.rl and run.init is None and "error" not in record:
                    # First in the queue: a sweep cut short then keeps whole before/after pairs, not more SFT runs.
                    pending.insert(0, run.follow_up())
    except KeyboardInterrupt:
        print(f"[quality] interrupted: stopping {len(running)} runs; {len(pending)} never started", flush=True)
        for run, (proc, t0) in running.items():
            stop(proc)
            on_done(read_run(run, None, time.monotonic() - t0))


def popularity(mode: Mode, extra: Sequence[str], scratch: Path) -> dict[str, Any]:
    """Recall/NDCG@5/10 of one list for every user, the train split's most frequent target SIDs, on the test users
    the mode's runs rank (its data and eval flags and `extra`'s): what a model that learned only popularity gets."""
    from sid.config import cli
    from sid.data.dataset import load_split
    from sid.data.tasks import eval_prompts
    from sid.eval.metrics import ranking_metrics
    from sid.jobs import TrainJob

    job = cli(TrainJob, args=["--config", str(ROOT / mode.config), *mode.overrides, *extra])
    train, _, _ = load_split(job.data, "train", run_dir=scratch)
    test, catalog, _ = load_split(job.data, job.eval.split, run_dir=scratch)
    targets = [t for _, t in eval_prompts(test, job.tasks)][: job.eval.max_samples or None]
    top = [sid for sid, _ in collections.Counter(r.target_sid for r in train).most_common(10)]
    got = ranking_metrics([top] * len(targets), targets, (5, 10), set(catalog.sids.values()))
    return {**{f"recall@{k}": got.hr[k] for k in (5, 10)}, **{f"ndcg@{k}": got.ndcg[k] for k in (5, 10)}}


def metric_stats(items: list[dict[str, Any]]) -> dict[str, Any]:
    """METRIC and METRIC_std: each metric's mean and sample standard deviation over the items that have it (no
    spread from one)."""
    out: dict[str, Any] = {}
    for m in METRICS:
        values = [i[m] for i in items if i.get(m) is not None]
        out[m] = statistics.fmean(values) if values else None
        out[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else None
    return out


def stage_of(record: dict[str, Any]) -> str:
    return record.get("stage", "sft")  # results JSONs written before --rl have SFT runs only


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant and stage (SFT, RL): mean and sample standard deviation of each metric over finished seeds."""
    rows = []
    for variant, stage in dict.fromkeys((r["variant"], stage_of(r)) for r in records):
        done = [r for r in records if (r["variant"], stage_of(r)) == (variant, stage) and "error" not in r]
        seeds = ",".join(str(r["seed"]) for r in done) or "-"
        rows.append({"variant": variant, "stage": stage, "seeds": seeds, **metric_stats(done)})
    return rows


def pair_status(sft: dict[str, Any], rl: dict[str, Any] | None) -> str:
    """'ok' when both runs measured the same test users, else why there is no before/after difference."""
    if "error" in sft:
        return f"no RL: SFT failed ({sft['error']})"
    if rl is None:
        return "no RL result (not finished, or the sweep ended before it started)"
    if "error" in rl:
        return f"RL failed: {rl['error']}"
    if rl.get("test_users") != sft.get("test_users"):
        return f"not comparable: {sft.get('test_users')} test users before, {rl.get('test_users')} after"
    return "ok"


def rl_pairs(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per SFT run: its test metrics (before), its RL run's (after), after - before, and the pair's status."""
    rl_runs = {(r["variant"], r["seed"]): r for r in records if stage_of(r) == "rl"}
    pairs = []
    for sft in (r for r in records if stage_of(r) == "sft"):
        rl = rl_runs.get((sft["variant"], sft["seed"]))
        status = pair_status(sft, rl)
        pair = {"variant": sft["variant"], "seed": sft["seed"], "before": {m: sft.get(m) for m in METRICS}}
        pair["after"] = {m: rl.get(m) for m in METRICS} if rl else None
        ok = status == "ok"
        pair["delta"] = {m: rl[m] - sft[m] for m in METRICS if None not in (rl[m], sft[m])} if ok else None
        pairs.append(pair | {"status": status, "rl_dir": rl and rl["dir"]})
    return pairs


def aggregate_pairs(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant, over its seeds with both runs: mean and sample std of before, after, and of the per-seed
    differences (the paired spread, smaller than before's and after's when seeds move both alike)."""
    rows = []
    for variant in dict.fromkeys(p["variant"] for p in pairs):
        done = [p for p in pairs if p["variant"] == variant and p["status"] == "ok"]
        row: dict[str, Any] = {"variant": variant, "seeds": ",".join(str(p["seed"]) for p in done) or "-"}
        rows.append(row | {part: metric_stats([p[part] for p in done]) for part in ("before", "after", "delta")})
    return rows


def best_cell(best: dict[str, Any] | None) -> str:
    """The chosen checkpoint as 'step S: METRIC VALUE' ('-' without selection)."""
    return f"step {best['step']}: {best['metric']} {best['value']:.4f}" if best else "-"


def fmt(v: float | None, std: float | None = None, sign: str = "") -> str:
    """A figure to 4 decimals ('-' when missing), ± its spread when given; sign '+' marks a difference."""
    return "-" if v is None else f"{v:{sign}.4f}" + (f" ± {std:.4f}" if std is not None else "")


def before_after_cells(before: dict | None, after: dict | None, delta: dict | None) -> dict[str, str]:
    """Table cells of each COMPARED metric: SFT, RL, and RL - SFT (with METRIC_std when the dicts have it)."""
    cells = {}
    for m in COMPARED:
        for label, part, sign in (("SFT", before, ""), ("RL", after, ""), ("Δ", delta, "+")):
            cells[f"{m} {label}"] = fmt((part or {}).get(m), (part or {}).get(f"{m}_std"), sign)
    return cells


def rl_report(rl: dict[str, Any]) -> list[str]:
    """The before/after tables: per seed, then per variant over the seeds with both runs."""
    per_seed = [
        {"run": run_name(p["variant"], p["seed"]), **before_after_cells(p["before"], p["after"], p["delta"]),
         "status": p["status"]}
        for p in rl["pairs"]
    ]  # fmt: skip
    lines = ["", f"SFT -> RL ({rl['config']}), test metrics per seed:"]
    lines.append(markdown_table(per_seed, {k: k for k in per_seed[0]}) if per_seed else "(no SFT run finished)")
    means = [
        {"variant": f"{a['variant']} (seeds {a['seeds']})", **before_after_cells(a["before"], a["after"], a["delta"])}
        for a in rl["summary"]
    ]
    if means:
        lines += ["", "SFT -> RL, mean ± sample std over seeds with both runs (Δ: of the per-seed differences):"]
        lines.append(markdown_table(means, {k: k for k in means[0]}))
    return lines


def report(result: dict[str, Any], mode: Mode) -> str:
    """The printed tables: every run, then each variant's mean ± std beside the published figures and the target,
    then (with --rl) the test metrics before and after RL."""
    runs = [
        {
            "run": run_name(r["variant"], r["seed"], stage_of(r)),
            **{m: fmt(r.get(m)) for m in METRICS},
            "best (valid)": best_cell(r.get("best")),
            "wall s": f"{r['wall_s']:.0f}",
            "status": r.get("error", "ok"),
        }
        for r in result["runs"]
    ]
    lines = ["Runs:", markdown_table(runs, {k: k for k in runs[0]}) if runs else "(none finished)"]
    means = [
        {
            "": f"{a['variant']}{' + RL' if a.get('stage') == 'rl' else ''} (seeds {a['seeds']})",
            **{m: fmt(a[m], a[f"{m}_std"]) for m in METRICS},
        }
        for a in result["summary"]
    ]
    for name, fig in (result.get("popularity") or {}).items():
        label = "popularity (10 most frequent train targets" + ("" if name == "base" else f", {name} data") + ")"
        means.append({"": label, **{m: fmt(fig[m]) for m in METRICS}})
    if mode.published:
        means += [{"": name, **{m: fmt(fig.get(m)) for m in METRICS}} for name, fig in PUBLISHED.items()]
        means.append({"": "target (issue 24)", **{m: fmt(TARGET.get(m)) for m in METRICS}})
    if means:
        lines += ["", "Mean ± sample std over seeds:", markdown_table(means, {k: k or "variant" for k in means[0]})]
    if mode.published:
        lines.append(f"Published: {PUBLISHED_SOURCE}.")
    if mode.note:
        lines.append(mode.note)
    if result.get("rl"):
        lines += rl_report(result["rl"])
    return "\n".join(lines)


def add_rl_options(p: argparse.ArgumentParser) -> None:
    """--rl and --rl-extra: the SFT -> RL follow-up runs."""
    p.add_argument(
        "--rl",
        metavar="RL_PRESET",
        help="After each SFT run that succeeds, GRPO on it with this sid.rl preset (relative to the repository "
        "root), e.g. configs/rl/gpu/letter_instruments.yaml, and the test metrics before and after.",
    )
    p.add_argument(
        "--rl-extra",
        type=shlex.split,
        default=[],
        help="sid.rl flags for every RL run, as one string: --rl-extra='--train.max-steps 300'.",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options; whatever follows `--` goes to every sid.train run (e.g. `-- --train.epochs 4`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags after `--` go to every sid.train run, after the variant's: e.g. -- --train.epochs 4.",
    )
    p.add_argument(
        "--mode", choices=MODES, default="gpu", help="Preset: gpu (LETTER Instruments), industrial, cpu, tiny."
    )
    p.add_argument(
        "--seeds",
        help="Seeds of variants listed without their own, e.g. 0-2 or 0,3 (gpu, industrial: 0-2; cpu, tiny: 0).",
    )
    p.add_argument(
        "--variants",
        nargs="+",
        default=["base"],
        help="Override sets to sweep, NAME or NAME:SEEDS (e.g. base:0-2 wide:0), run in this order: "
        + ", ".join(VARIANTS),
    )
    p.add_argument("--parallel", type=int, default=1, help="Runs at once (on one GPU each gets 0.9/N of its memory).")
    p.add_argument("--time-limit", type=float, default=0, help="Seconds per run before it is stopped (0: none).")
    add_rl_options(p)
    p.add_argument("--report", type=Path, help="Only print the tables of an earlier results JSON (no runs).")
    p.add_argument("--sweep-dir", type=Path, help="Where the runs go; default runs/quality/MODE-TIMESTAMP.")
    p.add_argument("--out", type=Path, help="Results JSON, rewritten after each run; default SWEEP_DIR/results.json.")
    args = p.parse_args(argv[:cut])
    args.set = argv[cut + 1 :]
    if args.parallel < 1:
        p.error("--parallel must be >= 1")
    if args.rl and not (ROOT / args.rl).is_file():
        p.error(f"--rl {args.rl}: no such preset (paths are relative to the repository root)")
    return args


def new_result(args: argparse.Namespace, mode: Mode) -> dict[str, Any]:
    """The results JSON before any run has finished."""
    return {
        "mode": args.mode,
        "config": mode.config,
        **host_environment(),
        "published": {"source": PUBLISHED_SOURCE, "figures": PUBLISHED, "target": TARGET} if mode.published else None,
        "note": mode.note,
        "runs": [],
        "summary": [],
        "rl": {"config": args.rl, "extra": args.rl_extra, "pairs": [], "summary": []} if args.rl else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        result = json.loads(args.report.read_text())
        print(report(result, MODES[result["mode"]]))
        return 0
    mode = MODES[args.mode]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    sweep_dir = (args.sweep_dir or ROOT / "runs" / "quality" / f"{args.mode}-{stamp}").absolute()
    out = args.out or sweep_dir / "results.json"
    runs = plan_runs(args.variants, args.seeds or mode.seeds, sweep_dir)
    result = new_result(args, mode)
    # The preset's data, and each variant that reads other data (other SIDs: other most frequent targets).
    data_variants = {r.variant for r in runs if any(f.startswith("--data.") for f in mode.variant_flags(r.variant))}
    result["popularity"] = {
        name: popularity(mode, [*mode.variant_flags(name), *args.set], sweep_dir / "popularity")
        for name in ["base", *sorted(data_variants)]
    }

    def on_done(record: dict[str, Any]) -> None:
        result["runs"].append(record)
        result["summary"] = aggregate(result["runs"])
        if result["rl"]:
            pairs = rl_pairs(result["runs"])
            result["rl"].update(pairs=pairs, summary=aggregate_pairs(pairs))
        write_json(out, result)
        figures = " ".join(f"{m}={record[m]:.4f}" for m in METRICS if record.get(m) is not None)
        name = run_name(record["variant"], record["seed"], record["stage"])
        print(f"[quality] {name}: {record.get('error') or figures}", flush=True)

    print(f"[quality] {len(runs)} runs, {args.parallel} at a time, in {sweep_dir}", flush=True)
    sweep(runs, mode, args, on_done)
    print(report(result, mode))
    print(f"results: {out}")
    return 0 if all("error" not in r for r in result["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
