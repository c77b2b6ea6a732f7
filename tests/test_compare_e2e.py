"""`make compare WHERE=local` with the real trainer and evaluator on the CPU smoke presets (same ref twice)."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_make_compare_local_same_ref_twice(tmp_path):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    assert head.returncode == 0, "needs a git checkout with a commit"
    out = tmp_path / "cmp"
    proc = subprocess.run(
        [
            "bash",
            "ops/compare.sh",
            "--a",
            "HEAD",
            "--b",
            "HEAD",
            "--train-config",
            "configs/train/cpu/smoke.yaml",
            "--eval-config",
            "configs/eval/cpu/smoke.yaml",
            "--where",
            "local",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "HR@10" in report and "final loss" in report.lower()
    sha = head.stdout.strip()[:7]
    assert (out / "runs" / f"a-{sha}" / "run_summary.json").is_file()
    assert (out / "runs" / f"b-{sha}" / "eval" / "run_summary.json").is_file()
    # Same code, same config, same seed: the two columns agree exactly (deltas are zero).
    rows = [line for line in report.splitlines() if line.startswith("| final loss")]
    assert rows, report
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1] == cells[2], rows[0]
    assert (out / "loss.png").is_file()
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=ROOT, capture_output=True, text=True).stdout
    assert str(out) not in worktrees
