"""Multi-process runs for real: `python -m sid.train --mesh.distributed` as 2 processes x 2 CPU devices joined by
`jax.distributed` (gloo collectives), against one process with the same 4 devices.

Checks what a pod slice relies on: process-local batch slices that add up to the same global batch, losses equal
to the single-process run's, exact resume from a checkpoint that both processes wrote, the eval's predictions
gathered from both processes, files and logs from process 0 only, and a clear failure, not a hang, when the
processes do not share the output directory.
"""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from sid.config import ConfigError, MeshConfig
from sid.parallel.distributed import init_distributed
from sid.parallel.mesh import make_mesh

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs/train/cpu/smoke.yaml")
PROCESSES, DEVICES_PER_PROCESS = 2, 2
TIMEOUT_S = 300  # a hang fails the test instead of stalling CI


def train_args(out: Path, steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "sid.train", "--config", SMOKE,
        "--train.output-dir", str(out),
        "--train.max-steps", str(steps),
        "--train.log-every", "1",
        "--train.schedule", "constant",  # the learning rate does not depend on max_steps: 3 + 3 steps == 6
        "--train.warmup-steps", "0",
        "--train.per-device-batch-size", "2",
        "--eval.max-samples", "16",
        *extra,
    ]  # fmt: skip


def env(devices: int) -> dict[str, str]:
    e = dict(os.environ)
    e.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_processes(args_of_process, while_running=None) -> list[subprocess.CompletedProcess]:
    """Start PROCESSES processes of one distributed run (args_of_process(i) -> argv), call
    `while_running(processes)` if given, and wait for all of them. Output goes to files, so a process that logs a
    lot while the test waits never blocks on a full pipe."""
    port = free_port()
    procs, outputs = [], []
    for i in range(PROCESSES):
        argv = args_of_process(i) + [
            "--mesh.distributed",
            "--mesh.coordinator-address", f"localhost:{port}",
            "--mesh.num-processes", str(PROCESSES),
            "--mesh.process-id", str(i),
        ]  # fmt: skip
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        outputs.append((out, err))
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env(DEVICES_PER_PROCESS), stdout=out, stderr=err, text=True))
    results = []
    try:
        if while_running is not None:
            while_running(procs)
        for p, (out, err) in zip(procs, outputs, strict=True):
            p.wait(timeout=TIMEOUT_S)
            out.seek(0), err.seek(0)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for out, err in outputs:
            out.close(), err.close()
    return results


def run_single(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=ROOT, env=env(PROCESSES * DEVICES_PER_PROCESS), capture_output=True, text=True, timeout=TIMEOUT_S
    )


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in recs if key in r}


def eval_losses(run: Path) -> dict[int, float]:
    return losses(run, "eval_loss")


def test_two_processes_train_resume_and_eval_like_one(tmp_path):
    shared = tmp_path / "two"
    held_out = ("--train.eval-loss-every", "3", "--train.eval-loss-batches", "2")
    two = run_processes(lambda i: train_args(shared, 6, *held_out))
    for i, r in enumerate(two):
        assert r.returncode == 0, f"process {i}:\n{r.stderr[-3000:]}"
    one = run_single(train_args(tmp_path / "one", 6, *held_out))
    assert one.returncode == 0, one.stderr[-3000:]

    summary = json.loads((shared / "run_summary.json").read_text())
    assert summary["train"]["devices"] == PROCESSES * DEVICES_PER_PROCESS and summary["train"]["final_step"] == 6
    assert "mesh {'dp': 2, 'fsdp': 2, 'tp': 1}" in two[0].stderr  # auto mesh: dp over processes
    # Same global batches, same math: only the reduction order differs (dp x fsdp = 2 x 2 against 1 x 4).
    got, want = losses(shared), losses(tmp_path / "one")
    assert sorted(got) == list(range(1, 7))
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    # Each device gathering the params once per step (--train.gather-params-once: one replica per device, over dp =
    # processes and fsdp within each; the gradient sum crosses processes): the same losses.
    once = tmp_path / "once"
    runs = run_processes(lambda i: train_args(once, 6, "--eval.no-enabled", "--train.gather-params-once"))
    assert [r.returncode for r in runs] == [0, 0], runs[0].stderr[-3000:] + runs[1].stderr[-3000:]
    assert "gathers the f32 params once per step" in runs[0].stderr
    assert losses(once) == pytest.approx(want, rel=1e-5, abs=1e-6)
    # The held-out loss: each process places its own rows of the valid batches.
    assert eval_losses(shared) == pytest.approx(eval_losses(tmp_path / "one"), rel=1e-5)
    assert sorted(eval_losses(shared)) == [3, 6]
    # The eval's beams are gathered from both processes into the same predictions and metrics.
    pred_two = json.loads((shared / "predictions.json").read_text())
    assert len(pred_two) == 16 and pred_two == json.loads((tmp_path / "one" / "predictions.json").read_text())
    assert summary["eval"]["hr"] == json.loads((tmp_path / "one" / "run_summary.json").read_text())["eval"]["hr"]
    assert (shared / "model" / "config.json").is_file()
    # Process 0 logs; process 1 stays quiet unless something is wrong.
    assert "step 6/6" in two[0].stderr and "eval on test" in two[0].stderr
    assert " INFO " not in two[1].stderr, two[1].stderr[-2000:]
    assert not (shared / ".sid_shared_check").exists()

    # Exact resume across processes: 3 steps, then 3 more from the checkpoint both processes wrote.
    resumed = tmp_path / "resumed"
    first = run_processes(lambda i: train_args(resumed, 3, "--eval.no-enabled"))
    assert [r.returncode for r in first] == [0, 0], first[0].stderr[-3000:] + first[1].stderr[-3000:]
    second = run_processes(lambda i: train_args(resumed, 6, "--eval.no-enabled", "--train.resume"))
    assert [r.returncode for r in second] == [0, 0], second[0].stderr[-3000:] + second[1].stderr[-3000:]
    assert "resumed from checkpoint step 3" in second[0].stderr
    after = losses(resumed)
    assert {s: after[s] for s in (4, 5, 6)} == {s: got[s] for s in (4, 5, 6)}  # bit-for-bit


def test_two_process_nanogpt_like_one(tmp_path):
    def args(out: Path) -> list[str]:
        return [
            sys.executable, "-m", "sid.nanogpt", "--config", str(ROOT / "configs/nanogpt/cpu_smoke.yaml"),
            "--train.output-dir", str(out), "--train.max-steps", "20", "--train.log-every", "5",
            "--train.eval-loss-every", "10", "--sample.num-samples", "0",
            "--mesh.dp", "0", "--mesh.fsdp", "0",  # the preset pins one device, which would leave process 1 out
        ]  # fmt: skip

    two = run_processes(lambda i: args(tmp_path / "two"))
    assert [r.returncode for r in two] == [0, 0], two[0].stderr[-3000:] + two[1].stderr[-3000:]
    one = run_single(args(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    # Each process draws only its rows of the held-out batches; they must be placed as one global array (taken
    # as whole batches, they gave 3.14 on two processes against 2.87 on one).
    got, want = eval_losses(tmp_path / "two"), eval_losses(tmp_path / "one")
    assert sorted(got) == [10, 20] and got == pytest.approx(want, rel=1e-3)


def test_sigterm_on_one_process_saves_on_all_at_the_same_step(tmp_path):
    # A pod's hosts get the preemption signal at different moments. Here only process 1 gets it: both must agree
    # on one step, write that checkpoint together and exit 75, preempted (a process that stopped alone to save would
    # wait forever for the other inside the collective save).
    run = tmp_path / "run"

    def preempt_process_1(procs):
        deadline = time.time() + TIMEOUT_S
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0):
            assert time.time() < deadline and all(p.poll() is None for p in procs), "training never started"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)

    results = run_processes(lambda i: train_args(run, 100_000, "--eval.no-enabled"), preempt_process_1)
    for i, r in enumerate(results):
        assert r.returncode == 75, f"process {i}:\n{r.stderr[-3000:]}"
    step = json.loads((run / "run_summary.json").read_text())["train"]["preempted_at"]
    assert step >= 1 and (run / "checkpoints" / str(step)).is_dir()
    assert f"saving a checkpoint at step {step} and exiting" in results[1].stderr
    assert f"preempted: checkpoint {step} saved" in results[0].stderr


def test_unshared_output_dir_fails_on_every_process_instead_of_hanging(tmp_path):
    # Each process gets its own directory, as host-local disks on a pod would give them.
    results = run_processes(lambda i: train_args(tmp_path / f"host{i}", 2, "--eval.no-enabled"))
    for i, r in enumerate(results):
        assert r.returncode == 2, f"process {i}:\n{r.stderr[-3000:]}"
        last = r.stderr.strip().splitlines()[-1]
        assert "process(es) [1] of 2 do not see process 0's run directory" in last, last
        assert "--train.output-dir" in last and "Traceback" not in r.stderr
    assert not (tmp_path / "host0" / "checkpoints").exists()


def test_explicit_process_id_must_be_in_range():
    with pytest.raises(ValueError, match=r"mesh.process_id=2 must be in \[0, mesh.num_processes=2\)"):
        init_distributed(MeshConfig(distributed=True, coordinator_address="localhost:1", num_processes=2, process_id=2))
    init_distributed(MeshConfig(distributed=False, process_id=7))  # not distributed: nothing is checked or joined


def test_mesh_rows_are_hosts_whatever_the_device_order():
    @dataclasses.dataclass(frozen=True)
    class FakeDevice:  # what the mesh reads of a device; ids interleave hosts, as they may on a pod
        id: int
        process_index: int

    devices = [FakeDevice(i, i % 2) for i in range(8)]
    mesh = make_mesh(MeshConfig(dp=2), devices)
    for row, host in zip(mesh.devices, (0, 1), strict=True):
        assert [d.process_index for d in row.ravel()] == [host] * 4
        assert [d.id for d in row.ravel()] == sorted(d.id for d in row.ravel())


def test_a_mesh_that_leaves_a_process_out_is_refused():
    @dataclasses.dataclass(frozen=True)
    class FakeDevice:
        id: int
        process_index: int

    devices = [FakeDevice(i, i // 2) for i in range(4)]
    with pytest.raises(ConfigError, match=r"process\(es\) \[0\] only, but processes \[1\] take part too"):
        make_mesh(MeshConfig(dp=1, fsdp=2), devices)  # nanoGPT's one-GPU presets pin dp=1, fsdp=1 like this
    assert make_mesh(MeshConfig(dp=2, fsdp=2), devices).devices.size == 4
