"""sid.compare: the A/B report's numbers come from the two runs' files, deltas are B − A, and a run with a
missing eval section, summary or directory still gives a report with the other column."""

import json
import shutil
from pathlib import Path

import pytest

from sid import compare

FIXTURES = Path(__file__).parent / "fixtures" / "compare"
KS = ["1", "3", "5", "10", "20", "50"]


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _line(name: str, a: float | None, b: float | None, spec: str = ".4f", scale: float = 1.0) -> str:
    """The expected markdown row, computed here from the fixture numbers."""

    def show(x, sign=""):
        return "—" if x is None else format(x * scale, sign + spec)

    d = None if a is None or b is None else b - a
    rel = "—" if d is None or not a else f"{100 * d / abs(a):+.1f}%"
    return f"| {name} | {show(a)} | {show(b)} | {show(d, '+')} | {rel} |"


@pytest.fixture
def runs(tmp_path):
    """Writable copies of the two fixture run directories."""
    a, b = tmp_path / "local_muon", tmp_path / "optax_muon"
    shutil.copytree(FIXTURES / "local_muon", a)
    shutil.copytree(FIXTURES / "optax_muon", b)
    return a, b


def _report(a: Path, b: Path, out: Path, *extra: str) -> str:
    assert compare.main([str(a), str(b), "--out", str(out), *extra]) == 0
    return (out / "report.md").read_text()


def test_table_has_fixture_numbers_and_deltas(runs, tmp_path):
    a, b = runs
    for run, gib in ((a, 3), (b, 5)):  # runs since 2026-11-23 record XLA's footprint of their step per device
        summary = _json(run / "run_summary.json")
        summary["train"]["step_memory_bytes"] = gib * 2**30
        (run / "run_summary.json").write_text(json.dumps(summary))
    report = _report(
        a,
        b,
        tmp_path / "out",
        "--label-a",
        "local",
        "--label-b",
        "optax",
        "--train-config",
        "configs/train/x.yaml",
        "--eval-config",
        "configs/eval/y.yaml",
    )
    ta, tb = _json(a / "run_summary.json")["train"], _json(b / "run_summary.json")["train"]
    # A's eval lives in eval/run_summary.json, B's inside its run_summary.json.
    ea, eb = _json(a / "eval" / "run_summary.json")["eval"], _json(b / "run_summary.json")["eval"]
    expected = [_line("final loss", ta["final_loss"], tb["final_loss"])]
    expected += [_line(f"HR@{k}", ea["hr"][k], eb["hr"][k]) for k in KS]
    expected += [_line(f"NDCG@{k}", ea["ndcg"][k], eb["ndcg"][k]) for k in KS]
    expected += [
        _line("step time (ms)", ta["step_time_s"], tb["step_time_s"], ".1f", 1000.0),
        _line("tokens/s", ta["tokens_per_s"], tb["tokens_per_s"], ",.0f"),
        _line("optimizer steps", ta["steps"], tb["steps"], ",.0f"),
        _line("step memory per device (MiB)", 3 * 2**30, 5 * 2**30, ",.1f", 1 / 2**20),
        _line("invalid predictions", ea["invalid_prediction_count"], eb["invalid_prediction_count"], ",.0f"),
    ]
    lines = report.splitlines()
    for line in expected:
        assert line in lines, f"missing row {line!r}"
    # HR rows come in numeric K order (10 after 5, not after 1).
    hr_rows = [ln.split(" | ")[0].removeprefix("| ") for ln in lines if ln.startswith("| HR@")]
    assert hr_rows == [f"HR@{k}" for k in KS]
    assert "A = local, B = optax" in report
    assert "`configs/train/x.yaml`" in report and "`configs/eval/y.yaml`" in report
    # The two configs differ only in the optimizer (the run directory is run-specific, not a difference).
    assert "| config.optimizer.name | `muon_local` | `muon_optax` |" in lines
    assert "output_dir" not in report.split("## Config differences")[1]
    assert (tmp_path / "out" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_best_held_out_loss_rows_come_from_metrics():
    best = {}
    for name in ("local_muon", "optax_muon"):
        points = []
        for line in (FIXTURES / name / "metrics.jsonl").read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if "eval_loss" in record:
                points.append((record["eval_loss"], record["step"]))
        best[name] = min(points)
    report = compare.render_report(
        compare.load_run(FIXTURES / "local_muon"),
        compare.load_run(FIXTURES / "optax_muon"),
        label_a="a",
        label_b="b",
        configs={},
        plot=None,
    )
    (la, sa), (lb, sb) = best["local_muon"], best["optax_muon"]
    assert _line("best held-out loss", la, lb) in report.splitlines()
    assert _line("step of best held-out loss", sa, sb, ",.0f") in report.splitlines()


def test_rows_are_b_minus_a():
    a, b = compare.load_run(FIXTURES / "local_muon"), compare.load_run(FIXTURES / "optax_muon")
    rows = {r.name: r for r in compare.metric_rows(a, b)}
    hr10 = rows["HR@10"]
    assert hr10.a == a.eval["hr"]["10"] and hr10.b == b.eval["hr"]["10"]
    assert hr10.delta == pytest.approx(b.eval["hr"]["10"] - a.eval["hr"]["10"])
    assert hr10.relative == pytest.approx(100 * hr10.delta / a.eval["hr"]["10"])
    # A zero baseline has a delta but no relative change.
    assert rows["invalid predictions"].a == 0 and rows["invalid predictions"].relative is None


def test_absent_eval_section_keeps_the_other_column(runs, tmp_path):
    a, b = runs
    summary = _json(b / "run_summary.json")
    del summary["eval"]
    (b / "run_summary.json").write_text(json.dumps(summary))
    report = _report(a, b, tmp_path / "out")
    ea = _json(a / "eval" / "run_summary.json")["eval"]
    for k in KS:
        assert _line(f"HR@{k}", ea["hr"][k], None) in report
        assert _line(f"NDCG@{k}", ea["ndcg"][k], None) in report
    ta = _json(a / "run_summary.json")["train"]
    assert _line("final loss", ta["final_loss"], summary["train"]["final_loss"]) in report
    missing = report.split("## Missing or partial results")[1].split("##")[0]
    assert "**B**: eval section absent" in missing and "**A**: eval" not in missing


def test_eval_summary_in_eval_dir_takes_precedence(runs, tmp_path):
    a, b = runs
    # A's own run_summary.json also gets an (end-of-training) eval section with other numbers.
    summary = _json(a / "run_summary.json")
    summary["eval"] = {"hr": {"10": 0.9}, "ndcg": {"10": 0.9}}
    (a / "run_summary.json").write_text(json.dumps(summary))
    run = compare.load_run(a)
    assert run.eval == _json(a / "eval" / "run_summary.json")["eval"]
    assert run.eval_source == a / "eval" / "run_summary.json"


@pytest.mark.parametrize("breakage", ["empty_dir", "no_dir", "train_crashed"])
def test_failed_run_still_gives_a_report(runs, tmp_path, breakage):
    a, b = runs
    if breakage == "empty_dir":
        shutil.rmtree(b)
        b.mkdir()
    elif breakage == "no_dir":
        shutil.rmtree(b)
    else:  # training died after writing its config: no train or eval section, a partial loss curve
        summary = _json(b / "run_summary.json")
        (b / "run_summary.json").write_text(json.dumps({k: summary[k] for k in ("config", "git_sha", "versions")}))
    report = _report(a, b, tmp_path / "out")
    ta = _json(a / "run_summary.json")["train"]
    assert _line("final loss", ta["final_loss"], None) in report
    missing = report.split("## Missing or partial results")[1].split("##")[0]
    expected = {"empty_dir": "no run_summary.json", "no_dir": "not found", "train_crashed": "train section absent"}
    assert expected[breakage] in missing
    assert (tmp_path / "out" / "loss.png").is_file()  # A's curve alone


def test_no_curves_no_plot(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for run in (a, b):
        run.mkdir()
        (run / "run_summary.json").write_text(json.dumps({"train": {"final_loss": 1.0}}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "loss.png").write_bytes(b"stale")
    report = _report(a, b, out)
    assert "No loss curve" in report and not (out / "loss.png").exists()


def test_loss_curve_skips_a_truncated_line():
    curve = compare.load_curve(FIXTURES / "local_muon" / "metrics.jsonl")
    assert curve.steps == tuple(range(8, 97, 8))
    assert curve.eval_steps == (32, 64, 96)
    assert curve.skipped_lines == 1
    # The last logged loss is the summary's final loss.
    assert curve.loss[-1] == _json(FIXTURES / "local_muon" / "run_summary.json")["train"]["final_loss"]


def test_summary_file_paths_are_accepted(tmp_path):
    run = compare.load_run(FIXTURES / "optax_muon" / "run_summary.json")
    assert run.path == FIXTURES / "optax_muon" and run.train is not None and not run.problems


def test_config_differences():
    a = {"config": {"optimizer": {"name": "adamw"}, "train": {"output_dir": "x", "seed": 0}}}
    b = {"config": {"optimizer": {"name": "adamw", "momentum": 0.9}, "train": {"output_dir": "y", "seed": 1}}}
    assert compare.config_differences(a, b) == [
        ("config.optimizer.momentum", "(absent)", 0.9),
        ("config.train.seed", 0, 1),
    ]
