"""bench/quality.py: its run plan, its reading of run_summary.json, its statistics (against NumPy), and its tiny mode
run as a user runs it (a real sid.train run, its figures checked against its own summary)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import quality  # noqa: E402


def bench_env(shared_data) -> dict[str, str]:
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
        SID_DATA_ROOT=str(shared_data),
    )


def test_plan_runs_orders_and_names_runs(tmp_path):
    runs = quality.plan_runs(["base:0-2", "drop0.2", "wide:1,3"], "5", tmp_path)
    assert [r.name for r in runs] == ["base-s0", "base-s1", "base-s2", "drop0.2-s5", "wide-s1", "wide-s3"]
    assert runs[3].out_dir == tmp_path / "drop0.2-s5"
    cmd = runs[4].command(quality.MODES["gpu"], ["--train.epochs", "2"])
    # The variant's flags, then the extra ones, then seed and output dir: later flags win in sid.train.
    assert cmd.index("--model.hidden-size") < cmd.index("--train.epochs") < cmd.index("--train.seed")
    assert cmd[-6:] == ["--train.seed", "1", "--model.seed", "1", "--train.output-dir", str(tmp_path / "wide-s1")]
    with pytest.raises(SystemExit, match="unknown variant 'nope'"):
        quality.plan_runs(["nope"], "0", tmp_path)
    with pytest.raises(SystemExit, match="bad seeds 'x'"):
        quality.plan_runs(["base:x"], "0", tmp_path)
    with pytest.raises(SystemExit, match="listed twice"):
        quality.plan_runs(["base:0-1", "base:1"], "0", tmp_path)


def test_child_env_shares_one_gpu():
    env = quality.child_env(4)
    assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225" and env["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    alone = quality.child_env(1)
    assert alone.get("XLA_PYTHON_CLIENT_MEM_FRACTION") == os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")


def fake_summary(run_dir: Path, hr10: float, ndcg10: float) -> None:
    """A run_summary.json shaped as sid.train writes it (sid.eval.metrics `to_dict`, train.best)."""
    run_dir.mkdir(parents=True)
    summary = {
        "eval": {"hr": {"5": hr10 / 2, "10": hr10}, "ndcg": {"5": ndcg10 / 2, "10": ndcg10}, "n_samples": 7},
        "train": {"final_step": 40, "wall_s": 1.0, "best": {"step": 20, "metric": "valid/ndcg@10", "value": 0.5}},
    }
    (run_dir / "run_summary.json").write_text(json.dumps(summary))


def test_read_run_and_aggregate_against_numpy(tmp_path):
    figures = {0: (0.11, 0.081), 1: (0.125, 0.09), 2: (0.118, 0.086)}
    records = []
    for seed, (hr, ndcg) in figures.items():
        run = quality.Run("base", seed, tmp_path / f"base-s{seed}")
        fake_summary(run.out_dir, hr, ndcg)
        records.append(quality.read_run(run, 0, 1.0))
    assert records[1]["recall@10"] == 0.125 and records[1]["ndcg@5"] == 0.045 and records[1]["best"]["step"] == 20
    # Failed runs are recorded with their reason and left out of the statistics.
    records.append(quality.read_run(quality.Run("base", 3, tmp_path / "missing"), 1, 1.0))
    records.append(quality.read_run(quality.Run("base", 4, tmp_path / "base-s0"), None, 61.0))
    assert "exited with status 1" in records[3]["error"] and "stopped after 61 s" in records[4]["error"]
    records.append(quality.read_run(quality.Run("wide", 0, tmp_path / "base-s2"), 0, 1.0))

    base, wide = quality.aggregate(records)
    assert base["seeds"] == "0,1,2" and wide["seeds"] == "0"
    hr10 = np.array([f[0] for f in figures.values()], dtype=np.float64)
    assert base["recall@10"] == pytest.approx(hr10.mean(), abs=1e-15)
    assert base["recall@10_std"] == pytest.approx(hr10.std(ddof=1), abs=1e-15)
    assert wide["ndcg@10"] == 0.086 and wide["ndcg@10_std"] is None  # one seed: no spread
    table = quality.report({"runs": records, "summary": [base, wide]}, quality.MODES["gpu"])
    assert "| base (seeds 0,1,2) | 0.0588 ± 0.0038 | 0.1177 ± 0.0075 |" in table
    assert "TIGER (published)" in table and "arXiv 2405.07314" in table
    assert "| step 20: valid/ndcg@10 0.5000 |" in table


def test_tiny_mode_reports_what_its_run_measured(tmp_path, shared_data):
    cmd = [sys.executable, "bench/quality.py", "--mode", "tiny", "--sweep-dir", str(tmp_path / "sweep")]
    cmd += ["--out", str(tmp_path / "results.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=bench_env(shared_data), capture_output=True, text=True, timeout=900)
    log = tmp_path / "sweep" / "base-s0.log"
    assert proc.returncode == 0, proc.stdout[-2000:] + (log.read_text()[-3000:] if log.is_file() else "")
    (record,) = json.loads((tmp_path / "results.json").read_text())["runs"]
    summary = json.loads((tmp_path / "sweep" / "base-s0" / "run_summary.json").read_text())
    assert record["recall@10"] == summary["eval"]["hr"]["10"] and record["ndcg@5"] == summary["eval"]["ndcg"]["5"]
    assert record["test_users"] == 16  # the tiny mode's eval.max_samples
    assert record["best"] == summary["train"]["best"] and record["best"]["metric"] == "valid/ndcg@10"
    assert "| base (seeds 0) |" in proc.stdout
    again = subprocess.run(
        [sys.executable, "bench/quality.py", "--report", str(tmp_path / "results.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and "| base (seeds 0) |" in again.stdout


def test_time_limit_stops_parallel_runs_and_keeps_the_results_file(tmp_path, shared_data):
    cmd = [sys.executable, "bench/quality.py", "--mode", "tiny", "--seeds", "0-1", "--parallel", "2"]
    cmd += ["--time-limit", "2", "--sweep-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=bench_env(shared_data), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    records = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert sorted(r["seed"] for r in records) == [0, 1]
    assert all(r["error"].startswith("stopped after") and r.get("recall@10") is None for r in records)
