"""`python -m sid.train` end to end: exact resume after a process kill, SIGTERM saves and exits 75 (preempted)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sid.stage import PREEMPTED_EXIT_CODE

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs/train/cpu/smoke.yaml")


def train_cmd(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sid.train",
        "--config",
        SMOKE,
        "--train.output-dir",
        str(out),
        "--eval.no-enabled",
        "--train.log-every",
        "1",
        "--train.schedule",
        "constant",
        "--train.warmup-steps",
        "0",
        "--optimizer.name",
        "muon_local",
        *extra,
    ]


def env():
    e = dict(os.environ)
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return e


def losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]  # a resumed run rewrites the steps it repeats: keep the last
    return out


def start_and_wait(cmd, ready, timeout=120):
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "training never got there"
        time.sleep(0.05)
    return proc


def test_resume_after_kill_is_bit_exact(tmp_path):
    killed = tmp_path / "killed"
    ckpts = killed / "checkpoints"
    # Long enough that it is still running when the first checkpoint lands; the constant schedule makes the
    # learning rate independent of max_steps, so a shorter resumed run follows the same trajectory.
    proc = start_and_wait(
        train_cmd(killed, "--train.max-steps", "100000", "--train.save-every", "3"),
        lambda: ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()),
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    target = latest + 3
    resumed = subprocess.run(
        train_cmd(killed, "--train.max-steps", str(target), "--train.resume"),
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from checkpoint step {latest}" in resumed.stderr
    straight = tmp_path / "straight"
    ref = subprocess.run(
        train_cmd(straight, "--train.max-steps", str(target)), cwd=ROOT, env=env(), capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr
    got, want = losses(killed), losses(straight)
    for step in range(latest + 1, target + 1):
        assert got[step] == want[step], (step, got[step], want[step])  # bit-for-bit
    assert json.loads((killed / "run_summary.json").read_text())["train"]["final_step"] == target

    # Starting afresh (no --train.resume) over that run fails at once, with one line, and leaves its files alone.
    before = {p: p.read_bytes() for p in killed.rglob("*") if p.is_file()}
    again = subprocess.run(
        train_cmd(killed, "--train.max-steps", str(target)), cwd=ROOT, env=env(), capture_output=True, text=True
    )
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "earlier run's checkpoints" in again.stderr.splitlines()[-1] and "--train.resume" in again.stderr
    assert {p: p.read_bytes() for p in killed.rglob("*") if p.is_file()} == before


def test_sigterm_saves_a_checkpoint_and_exits_with_the_preempted_code(tmp_path):
    run = tmp_path / "run"
    proc = start_and_wait(
        train_cmd(run, "--train.max-steps", "100000"),
        lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0,
    )
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE == 75, err  # a scheduler tells it from a finished run
    summary = json.loads((run / "run_summary.json").read_text())
    assert summary["status"] == "preempted" and summary["exit_code"] == 75
    step = summary["train"]["preempted_at"]
    assert step >= 1 and (run / "checkpoints" / str(step)).is_dir()
    assert "SIGTERM received" in err


def test_gather_params_once_trains_like_fsdp(tmp_path):
    # Two devices: the smoke config's auto mesh is fsdp2, with 2 micro-batches per step. Gathering the params once
    # per step changes only where gradients are summed (float order), so the losses agree to float noise.
    runs = {}
    for name, extra in (("fsdp", ()), ("once", ("--train.gather-params-once",))):
        out = tmp_path / name
        proc = subprocess.run(
            train_cmd(out, "--train.max-steps", "4", *extra), cwd=ROOT, env=env(), capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        runs[name] = (losses(out), proc.stderr)
    assert "gathers the f32 params once per step" in runs["once"][1]
    assert "gathers the f32 params" not in runs["fsdp"][1]
    assert sorted(runs["once"][0]) == sorted(runs["fsdp"][0]) == [1, 2, 3, 4]
    for step, loss in runs["fsdp"][0].items():
        assert abs(runs["once"][0][step] - loss) <= 1e-5 * abs(loss), step
