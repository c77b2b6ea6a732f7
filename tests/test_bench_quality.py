"""bench/quality.py: its run plan, its reading of run_summary.json, its statistics (against NumPy), the SFT -> RL
pairs, and its tiny mode run as a user runs it (a real sid.train run and a real sid.rl run on top of it, their
figures checked against their own summaries)."""

import argparse
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


RL_TINY = "configs/rl/cpu/letter_instruments_tiny.yaml"


def test_rl_run_follows_its_sft_run_with_its_data_and_eval_flags(tmp_path):
    (sft,) = quality.plan_runs(["built_sids:2"], "0", tmp_path)
    rl = sft.follow_up()
    assert (rl.name, rl.stage, rl.init) == ("built_sids-s2-rl", "rl", sft.out_dir)
    assert rl.out_dir == tmp_path / "built_sids-s2-rl"
    args = argparse.Namespace(set=["--train.epochs", "3", "--data.max-history", "5"], rl=RL_TINY,
                              rl_extra=["--train.max-steps", "7"])  # fmt: skip
    cmd = quality.run_command(rl, quality.MODES["tiny"], args)
    assert cmd[1:5] == ["-m", "sid.rl", "--config", str(quality.ROOT / RL_TINY)]
    flags = cmd[5:]
    # The SFT run's catalog, test users and cut-offs (mode, variant, `--` flags), not its training schedule.
    assert flags[: flags.index("--rl.init")] == [
        *("--data.max-users", "40", "--eval.max-samples", "16", "--eval.topk", "5", "10"),
        *("--data.dir", "built_sids/letter_instruments", "--data.max-history", "5", "--train.max-steps", "7"),
    ]
    assert flags[flags.index("--rl.init") :] == [
        *("--rl.init", str(sft.out_dir), "--train.seed", "2", "--train.output-dir", str(rl.out_dir)),
    ]
    assert quality.run_command(sft, quality.MODES["tiny"], args)[:3] == [sys.executable, "-m", "sid.train"]
    # built_sids reads the SIDs built for the mode's own dataset.
    assert quality.MODES["industrial"].variant_flags("built_sids") == ["--data.dir", "built_sids/minionerec_industrial"]
    assert quality.MODES["gpu"].variant_flags("built_sids") == ["--data.dir", "built_sids/letter_instruments"]
    assert quality.shared_flags(["--eval.topk=5", "--model.seed", "1", "--tasks.next-sid", "true"]) == [
        *("--eval.topk=5", "--tasks.next-sid", "true"),
    ]


def fake_summary(run_dir: Path, hr10: float, ndcg10: float, n_samples: int = 7) -> None:
    """A run_summary.json shaped as sid.train writes it (sid.eval.metrics `to_dict`, train.best)."""
    run_dir.mkdir(parents=True)
    summary = {
        "eval": {"hr": {"5": hr10 / 2, "10": hr10}, "ndcg": {"5": ndcg10 / 2, "10": ndcg10}, "n_samples": n_samples},
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


def test_rl_pairs_report_before_after_and_failures(tmp_path):
    before = {0: (0.11, 0.081), 1: (0.125, 0.09), 2: (0.118, 0.086), 3: (0.1, 0.07), 4: (0.1, 0.07)}
    after = {0: (0.115, 0.083), 1: (0.121, 0.091), 2: (0.13, 0.094)}
    records = []
    for seed, (hr, ndcg) in before.items():
        sft = quality.Run("base", seed, tmp_path / f"base-s{seed}")
        fake_summary(sft.out_dir, hr, ndcg)
        records.append(quality.read_run(sft, 0, 1.0))
        if seed in after:
            fake_summary(sft.follow_up().out_dir, *after[seed])
        elif seed == 3:  # RL measured other test users: no difference is taken
            fake_summary(sft.follow_up().out_dir, 0.2, 0.1, n_samples=9)
        records.append(quality.read_run(sft.follow_up(), 2 if seed == 4 else 0, 1.0))
    records.append(quality.read_run(quality.Run("base", 5, tmp_path / "missing"), 1, 1.0))
    records.append(quality.read_run(quality.Run("base", 6, tmp_path / "base-s0"), 0, 1.0))  # RL never ran
    pairs = quality.rl_pairs(records)
    assert [p["seed"] for p in pairs] == [0, 1, 2, 3, 4, 5, 6] and [p["status"] for p in pairs][:3] == ["ok"] * 3
    assert pairs[3]["status"] == "not comparable: 7 test users before, 9 after" and pairs[3]["delta"] is None
    assert pairs[4]["status"] == "RL failed: sid.rl exited with status 2 (see base-s4-rl.log)"
    assert pairs[5]["status"].startswith("no RL: SFT failed (sid.train exited with status 1")
    assert pairs[6]["status"].startswith("no RL result") and pairs[6]["after"] is None
    assert pairs[1]["before"]["recall@10"] == 0.125 and pairs[1]["after"]["ndcg@10"] == 0.091
    assert pairs[1]["rl_dir"] == str(tmp_path / "base-s1-rl")

    (row,) = quality.aggregate_pairs(pairs)
    assert row["seeds"] == "0,1,2"
    delta = np.array([np.subtract(after[s], before[s]) for s in range(3)], dtype=np.float64)  # [seed, (hr, ndcg)]
    assert row["delta"]["ndcg@10"] == pytest.approx(delta[:, 1].mean(), abs=1e-15)
    assert row["delta"]["ndcg@10_std"] == pytest.approx(delta[:, 1].std(ddof=1), abs=1e-15)
    assert row["after"]["recall@10"] == pytest.approx(np.mean([a[0] for a in after.values()]), abs=1e-15)
    result = {"runs": records, "summary": quality.aggregate(records), "rl": {"config": RL_TINY, "pairs": pairs}}
    result["rl"]["summary"] = [row]
    table = quality.report(result, quality.MODES["gpu"])
    assert "| base-s0 | 0.1100 | 0.1150 | +0.0050 | 0.0810 | 0.0830 | +0.0020 | ok |" in table
    mean, std = delta.mean(0), delta.std(0, ddof=1)
    assert (
        f"| base (seeds 0,1,2) | 0.1177 ± 0.0075 | 0.1220 ± 0.0075 | {mean[0]:+.4f} ± {std[0]:.4f} | "
        f"0.0857 ± 0.0045 | 0.0893 ± 0.0057 | {mean[1]:+.4f} ± {std[1]:.4f} |"
    ) in table
    assert "| base + RL (seeds 0,1,2,3) |" in table  # the RL runs' own means, beside the SFT runs'


def check_tiny_run(sweep: Path, record: dict, stage: str) -> dict:
    """A tiny run's record against its run directory's run_summary.json; returns the summary."""
    summary = json.loads((sweep / quality.run_name("base", 0, stage) / "run_summary.json").read_text())
    assert record["stage"] == stage and "error" not in record
    assert record["recall@10"] == summary["eval"]["hr"]["10"] and record["ndcg@5"] == summary["eval"]["ndcg"]["5"]
    assert record["test_users"] == 16  # the tiny mode's eval.max_samples, passed on to the RL run
    assert record["best"] == summary["train"]["best"] and record["best"]["metric"] == "valid/ndcg@10"
    assert all(0 <= record[m] <= 1 for m in quality.METRICS)
    return summary


def test_popularity_baseline_against_the_raw_files(tmp_path, shared_data, monkeypatch):
    """The popularity row of the tiny mode on 300 users: their 10 most frequent train targets (leave-one-out: items 1
    to n - 3 of each sequence), counted from the raw LETTER files, ranked for the first 200 (each one's last item)."""
    monkeypatch.setenv("SID_DATA_ROOT", str(shared_data))
    flags = ["--data.max-users", "300", "--eval.max-samples", "200"]
    got = quality.popularity(quality.MODES["tiny"], flags, tmp_path)
    letter = shared_data / "letter_instruments"
    seqs = list(json.loads((letter / "Instruments.inter.json").read_text()).values())[:300]
    sids = {int(k): "".join(v) for k, v in json.loads((letter / "Instruments.index.json").read_text()).items()}
    counts: dict[str, int] = {}
    for seq in seqs:
        for item in seq[1:-2]:
            counts[sids[item]] = counts.get(sids[item], 0) + 1
    top = sorted(counts, key=lambda sid: -counts[sid])[:10]  # a stable sort: ties in first-seen order
    ranks = [top.index(sids[seq[-1]]) if sids[seq[-1]] in top else None for seq in seqs[:200]]
    for k in (5, 10):
        hits = [r for r in ranks if r is not None and r < k]
        assert got[f"recall@{k}"] == pytest.approx(len(hits) / 200)
        assert got[f"ndcg@{k}"] == pytest.approx(sum(1 / np.log2(r + 2) for r in hits) / 200)
    assert got["recall@10"] > 0  # the check above compares something


def test_tiny_mode_runs_sft_then_rl_and_reports_what_they_measured(tmp_path, shared_data):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "bench/quality.py", "--mode", "tiny", "--sweep-dir", str(sweep), "--rl", RL_TINY]
    cmd += ["--out", str(tmp_path / "results.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=bench_env(shared_data), capture_output=True, text=True, timeout=900)
    logs = "".join(log.read_text()[-3000:] for log in sweep.glob("*.log"))
    assert proc.returncode == 0, proc.stdout[-2000:] + logs
    result = json.loads((tmp_path / "results.json").read_text())
    sft_record, rl_record = result["runs"]
    check_tiny_run(sweep, sft_record, "sft")
    rl_summary = check_tiny_run(sweep, rl_record, "rl")
    # The RL run loaded the SFT run's export, with the tiny mode's users (not the RL preset's whole dataset).
    assert rl_record["init"] == rl_summary["train"]["init"] == str(sweep / "base-s0" / "model")
    assert rl_summary["config"]["data"]["max_users"] == 40 and rl_summary["config"]["train"]["seed"] == 0
    (pair,) = result["rl"]["pairs"]
    assert pair["status"] == "ok" and pair["rl_dir"] == str(sweep / "base-s0-rl")
    assert all(pair["delta"][m] == rl_record[m] - sft_record[m] for m in quality.METRICS)
    assert pair["before"]["ndcg@10"] == sft_record["ndcg@10"] and pair["after"]["ndcg@10"] == rl_record["ndcg@10"]
    assert result["rl"]["summary"][0]["seeds"] == "0"
    assert "| base (seeds 0) |" in proc.stdout and "| base + RL (seeds 0) |" in proc.stdout
    assert list(result["popularity"]) == ["base"] and "| popularity (10 most frequent train targets) |" in proc.stdout
    assert "SFT -> RL (configs/rl/cpu/letter_instruments_tiny.yaml)" in proc.stdout
    again = subprocess.run(
        [sys.executable, "bench/quality.py", "--report", str(tmp_path / "results.json")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert again.returncode == 0 and "| base (seeds 0) |" in again.stdout and "| base-s0 |" in again.stdout


def test_time_limit_stops_parallel_runs_and_keeps_the_results_file(tmp_path, shared_data):
    cmd = [sys.executable, "bench/quality.py", "--mode", "tiny", "--seeds", "0-1", "--parallel", "2"]
    cmd += ["--time-limit", "2", "--sweep-dir", str(tmp_path), "--rl", RL_TINY]
    proc = subprocess.run(cmd, cwd=ROOT, env=bench_env(shared_data), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "results.json").read_text())
    records = result["runs"]
    assert sorted(r["seed"] for r in records) == [0, 1]  # no RL run follows a stopped SFT run
    assert all(r["error"].startswith("stopped after") and r.get("recall@10") is None for r in records)
    assert [p["status"][:32] for p in result["rl"]["pairs"]] == ["no RL: SFT failed (stopped after"] * 2
