"""nanoGPT Tiny-Shakespeare regression benchmark: the standard AdamW config and the Muon config through
`sid.nanogpt.run_nanogpt` (the shared trainer), their best held-out loss, its step, ms/iter and tokens/s, and a
PNG of the two eval-loss curves (from each run's metrics.jsonl).

ms/iter is reported twice: the trainer's (run_summary.json `ms_per_iter`: the mean over all timed steps, held-out
evaluations excluded) and the median of the per-step times the trainer logs every `log_every` steps, which is
robust to the odd slow step.

    python bench/nanogpt_shakespeare.py --out runs/bench/nanogpt.json                # GPU, 5000 steps each
    python bench/nanogpt_shakespeare.py --tiny --out /tmp/nanogpt_tiny.json          # CPU smoke (cpu_smoke.yaml)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

from common import host_environment, jax_environment, markdown_table, write_json

from sid.config import cli
from sid.jobs import NanoGPTJob
from sid.nanogpt import run_nanogpt

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "nanogpt"
RUNS = {
    "adamw": (CONFIGS / "tinyshakespeare_char.yaml", []),
    "muon": (CONFIGS / "tinyshakespeare_char_muon.yaml", []),
}
TINY_RUNS = {  # the CPU smoke config, once as is (AdamW) and once under Muon
    "adamw": (CONFIGS / "cpu_smoke.yaml", []),
    "muon": (
        CONFIGS / "cpu_smoke.yaml",
        ["--optimizer.name", "muon_local", "--train.learning-rate", "0.02", "--train.aux-learning-rate", "3e-3"],
    ),
}


def run_one(name: str, config: Path, overrides: list[str], runs_dir: Path) -> dict[str, Any]:
    """Train one config; summarise it from its run_summary.json and metrics.jsonl."""
    out_dir = runs_dir / name
    if out_dir.exists():  # a previous run's metrics.jsonl would be appended to
        print(f"removing the previous run {out_dir}", file=sys.stderr)
        shutil.rmtree(out_dir)
    job = cli(NanoGPTJob, args=["--config", str(config), "--train.output-dir", str(out_dir), *overrides])
    summary = run_nanogpt(job)["train"]
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    step_times = [r["step_time_s"] for r in records if "step_time_s" in r and r["step"] > 1]
    tokens_per_step = summary["effective_batch_size"] * job.model.block_size
    median_ms = 1000 * statistics.median(step_times) if step_times else None
    return {
        "name": name,
        "config": str(config),
        "overrides": overrides,
        "optimizer": job.optimizer.name,
        "steps": summary["final_step"],
        "tokens_per_step": tokens_per_step,
        "best_eval_loss": summary["best_eval_loss"],
        "best_eval_step": summary["best_eval_step"],
        "final_train_loss": summary["final_train_loss"],
        "ms_per_iter": summary["ms_per_iter"],
        "tokens_per_s": summary["tokens_per_s"],
        "median_ms_per_iter": median_ms,
        "median_tokens_per_s": tokens_per_step / median_ms * 1000 if median_ms else None,
        "compile_s": summary["compile_s"],
        "devices": summary["devices"],
        "wall_s": summary["wall_s"],
        "eval_curve": curve,
        "run_dir": str(out_dir),
    }


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    """The eval-loss curves of the runs in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in (r for r in runs if r["eval_curve"]):
        steps, losses = zip(*r["eval_curve"], strict=True)
        ax.plot(
            steps,
            losses,
            marker="o",
            markersize=3,
            label=f"{r['name']} (best {r['best_eval_loss']:.4f} @ {r['best_eval_step']})",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench/nanogpt_shakespeare.json", help="JSON results path")
    p.add_argument(
        "--png", default=None, help="eval-loss figure (default docs/nanogpt_eval_loss.png; --tiny: beside --out)"
    )
    p.add_argument(
        "--runs-dir",
        default=None,
        help="where the two runs go, as RUNS_DIR/adamw and RUNS_DIR/muon "
        "(replaced if present; default runs/bench/nanogpt; --tiny: beside "
        "--out)",
    )
    p.add_argument("--max-steps", type=int, default=0, help="override both configs' train.max_steps (0: keep)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke: cpu_smoke.yaml, 20 steps, eval every 10")
    args = p.parse_args(argv)
    if args.png is None:
        args.png = str(Path(args.out).with_suffix(".png")) if args.tiny else "docs/nanogpt_eval_loss.png"
    if args.runs_dir is None:
        args.runs_dir = str(Path(args.out).parent / "nanogpt_runs") if args.tiny else "runs/bench/nanogpt"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs_cfg = TINY_RUNS if args.tiny else RUNS
    extra = (
        [
            "--train.max-steps",
            "20",
            "--train.eval-loss-every",
            "10",
            "--train.eval-loss-batches",
            "2",
            "--sample.max-new-tokens",
            "20",
        ]
        if args.tiny
        else []
    )
    if args.max_steps:
        extra += ["--train.max-steps", str(args.max_steps)]
    runs = [run_one(name, cfg, overrides + extra, Path(args.runs_dir)) for name, (cfg, overrides) in runs_cfg.items()]
    env = jax_environment()
    plot(runs, Path(args.png), f"nanoGPT Tiny Shakespeare (char) on {runs[0]['devices']} x {env['device_kind']}")
    write_json(
        args.out,
        {
            "benchmark": "nanogpt_shakespeare",
            "args": vars(args),
            **host_environment(),
            **env,
            "runs": runs,
            "png": args.png,
        },
    )
    print(
        markdown_table(
            runs,
            {
                "name": "run",
                "optimizer": "optimizer",
                "steps": "steps",
                "best_eval_loss": "best val loss",
                "best_eval_step": "at step",
                "median_ms_per_iter": "ms/iter (median)",
                "ms_per_iter": "ms/iter (trainer)",
                "median_tokens_per_s": "tokens/s (median)",
                "compile_s": "compile s",
            },
        )
    )
    print(f"\nwrote {Path(args.out).resolve()} and {Path(args.png).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
