"""Reliability (issue 23): damaged checkpoints fall back, an unwritable checkpoint directory fails without hanging,
nothing non-finite is saved or written as bare NaN, results files appear whole or not at all, small input checks,
W&B placement, and kill -9 at random points resumes bitwise."""

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import types
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from test_trainer import ToyBatches, run_fit, toy_loss, toy_model

from sid.checkpoint import Checkpointer, CheckpointError, abstract_like, all_finite
from sid.config import ConfigError, MeshConfig, TrainConfig, WandbConfig, from_dict
from sid.errors import NonFiniteLoss
from sid.eval.config import EvalConfig
from sid.parallel.mesh import make_mesh
from sid.run import RunDir
from sid.step import init_state
from sid.tracking import Tracker

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
SMOKE = str(ROOT / "configs/train/cpu/smoke.yaml")


def params_of(model) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


def strict_records(path: Path) -> list[dict]:
    """metrics.jsonl as a strict JSON reader sees it (bare NaN / Infinity rejected)."""

    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def toy_abstract_state():
    state, _, _ = init_state(
        toy_model(), optax.adam(optax.constant_schedule(0.05)), seed=0, mesh=make_mesh(MeshConfig())
    )
    return abstract_like(state)


# --- 1. a damaged newest checkpoint falls back to the newest intact one ---------------------------------------------


def _damage(step_dir: Path, kind: str) -> None:
    if kind == "truncated data/metadata":
        os.truncate(step_dir / "data" / "metadata", 3)
    elif kind == "zeroed array blob":  # the largest data file holds the arrays; zeros fail only when read
        blob = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
        blob.write_bytes(bytes(blob.stat().st_size))
    elif kind == "zeroed array blobs":  # every one: a params-only restore (eval) reads only some of them
        for blob in (step_dir / "state").rglob("d/*"):
            blob.write_bytes(bytes(blob.stat().st_size))
    elif kind == "deleted state/_METADATA":
        (step_dir / "state" / "_METADATA").unlink()
    elif kind == "deleted state/":
        shutil.rmtree(step_dir / "state")


DAMAGE = ["truncated data/metadata", "zeroed array blob", "deleted state/_METADATA", "deleted state/"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """8 uninterrupted steps of the toy: the reference every resume must reproduce bitwise."""
    model, _ = run_fit(tmp_path_factory.mktemp("straight"), ToyBatches(), steps=8)
    return params_of(model)


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_falls_back_past_a_damaged_checkpoint_bitwise(tmp_path, straight_run, kind):
    run_fit(tmp_path, ToyBatches(), steps=6, save_every=2, keep_checkpoints=3)  # checkpoints 2, 4, 6
    _damage(tmp_path / "checkpoints" / "6", kind)
    model, summary = run_fit(tmp_path, ToyBatches(), steps=8, save_every=2, keep_checkpoints=3, resume=True)
    log = (tmp_path / "train.log").read_text()
    warnings = [line for line in log.splitlines() if "is damaged" in line]
    assert len(warnings) == 1 and f"{tmp_path / 'checkpoints' / '6'} is damaged (" in warnings[0]
    assert "resumed from checkpoint step 4" in log and summary["start_step"] == 4
    for got, want in zip(params_of(model), straight_run, strict=True):
        np.testing.assert_array_equal(got, want)
    # The damaged step is kept aside, and the resumed run saved step 6 again.
    assert (tmp_path / "checkpoints.damaged" / "6").is_dir() and (tmp_path / "checkpoints" / "8").is_dir()
    # Item 5: after the resume each step appears once in metrics.jsonl.
    assert [r["step"] for r in strict_records(tmp_path / "metrics.jsonl")] == list(range(1, 9))


def test_no_intact_checkpoint_is_one_error_naming_each_step(tmp_path):
    run_fit(tmp_path, ToyBatches(), steps=4, save_every=2)  # checkpoints 2, 4
    _damage(tmp_path / "checkpoints" / "4", "truncated data/metadata")
    _damage(tmp_path / "checkpoints" / "2", "deleted state/")
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3)
    with pytest.raises(CheckpointError) as e:
        ckpt.restore_latest_intact(toy_abstract_state())
    ckpt.close()
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{tmp_path / 'checkpoints'}: no intact checkpoint")
    assert "step 4: JSONDecodeError" in message and "step 2: KeyError" in message
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]  # nothing moved


def test_a_checkpoint_holding_nan_is_not_intact(tmp_path):
    abstract = toy_abstract_state()
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3)
    good = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype, device=s.sharding), abstract)
    poisoned = jax.tree.map(lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, good)
    ckpt.save(1, good, {"i": 1})
    ckpt.save(2, poisoned, {"i": 2}, wait=True)
    step, state, data = ckpt.restore_latest_intact(abstract)
    ckpt.close()
    assert (step, data) == (1, {"i": 1}) and all_finite(state)


def test_eval_checkpoint_falls_back_from_a_damaged_export_to_the_newest_intact_checkpoint(tmp_path):
    """sid.eval --eval.checkpoint RUN_DIR: the exported model, else (damaged) the newest intact checkpoint, whose
    params are the export's bitwise (the final step is saved and exported in float32)."""
    from sid.config import load_yaml
    from sid.data.dataset import load_split
    from sid.eval.__main__ import load_checkpoint
    from sid.jobs import EvalJob
    from sid.train import main as train_main

    run = tmp_path / "run"
    args = ["--config", SMOKE, "--train.output-dir", str(run), "--train.max-steps", "4", "--train.save-every", "2"]
    assert train_main([*args, "--eval.no-enabled", "--train.keep-checkpoints", "3"]) == 0
    base = load_yaml(EvalJob, ROOT / "configs/eval/cpu/smoke.yaml")

    def evaluating(path: Path) -> EvalJob:
        return dataclasses.replace(base, eval=dataclasses.replace(base.eval, checkpoint=str(path)))

    job = evaluating(run)
    catalog = load_split(job.data, "test", run_dir=tmp_path / "eval")[1]

    exported, tok = load_checkpoint(job, catalog)
    os.truncate(run / "model" / "model.safetensors", 100)
    from_ckpt, tok4 = load_checkpoint(job, catalog)
    assert tok4.vocab_size == tok.vocab_size
    for got, want in zip(params_of(from_ckpt), params_of(exported), strict=True):
        np.testing.assert_array_equal(got, want)
    log = (tmp_path / "run" / "train.log").read_text()  # sid's logger still writes to the last RunDir's log
    assert f"{run}: " in log and "evaluating its newest intact checkpoint instead" in log

    _damage(run / "checkpoints" / "4", "zeroed array blobs")
    step2, _ = load_checkpoint(job, catalog)
    direct, _ = load_checkpoint(evaluating(run / "checkpoints" / "2"), catalog)  # a step directory
    for got, want in zip(params_of(step2), params_of(direct), strict=True):
        np.testing.assert_array_equal(got, want)
    assert any(not np.array_equal(a, b) for a, b in zip(params_of(step2), params_of(exported), strict=True))
    _damage(run / "checkpoints" / "2", "zeroed array blobs")
    with pytest.raises(CheckpointError, match="no intact checkpoint to evaluate .*step 4: .*step 2: "):
        load_checkpoint(job, catalog)


# --- 2. an unwritable checkpoint directory: a clear error, a non-zero exit, no hang ----------------------------------


def test_checkpoint_dir_that_is_a_file_fails_at_once(tmp_path):
    (tmp_path / "checkpoints").write_text("not a directory")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'checkpoints'}: cannot write checkpoint: "):
        Checkpointer(tmp_path / "checkpoints", keep=2)


def _lock(directory: Path):
    """Make `directory` unwritable even for root (chattr +i; chmod does not stop root), or skip the test."""
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr")
    directory.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode == 0
    if ok and subprocess.run(["touch", str(directory / "x")], capture_output=True).returncode == 0:
        subprocess.run(["chattr", "-i", str(directory)], check=True)
        ok = False
    if not ok:
        pytest.skip("chattr +i does not stop writes here (needs root on ext4/xfs)")


def _unlock(directory: Path) -> None:
    subprocess.run(["chattr", "-i", str(directory)], capture_output=True)


class LockAfterFirstSave(ToyBatches):
    def __init__(self, directory: Path):
        super().__init__()
        self.directory = directory

    def __next__(self):
        if self.i == 3:  # once step 2's checkpoint is committed, the directory turns read-only
            deadline = time.monotonic() + 60
            while not (self.directory / "2").is_dir() and time.monotonic() < deadline:
                time.sleep(0.01)
            _lock(self.directory)
        return super().__next__()


def test_checkpoint_dir_turning_read_only_fails_the_next_save(tmp_path):
    """The write probe before each save turns a read-only directory into one error line at that save."""
    try:
        with pytest.raises(CheckpointError, match=f"^{tmp_path / 'checkpoints'}: cannot write checkpoint step 4: "):
            run_fit(tmp_path, LockAfterFirstSave(tmp_path / "checkpoints"), steps=12, save_every=2)
    finally:
        _unlock(tmp_path / "checkpoints")
    assert max(r["step"] for r in strict_records(tmp_path / "metrics.jsonl")) == 4


FAILED_BACKGROUND_SAVE = """
import sys
sys.path.insert(0, {tests!r})
from pathlib import Path
import sid.checkpoint
from test_reliability import LockAfterFirstSave
from test_trainer import run_fit

out = Path({out!r})
sid.checkpoint.Checkpointer._probe = lambda self, step: None  # a mount turning read-only after the probe
run_fit(out, LockAfterFirstSave(out / "checkpoints"), steps=12, save_every=2)
"""


def test_a_failed_background_save_errors_and_the_process_exits(tmp_path):
    """Orbax's background save fails; the error must come by the next save and the process must then exit (its
    waiting helper threads used to keep it alive for minutes after the error)."""
    _lock(tmp_path / "probe")  # skips where chattr cannot lock
    _unlock(tmp_path / "probe")
    out = tmp_path / "run"
    script = FAILED_BACKGROUND_SAVE.format(tests=str(TESTS), out=str(out))
    try:
        proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=120)
    finally:
        _unlock(out / "checkpoints")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("sid.checkpoint.CheckpointError: ")]
    assert errors and errors[-1].startswith(f"sid.checkpoint.CheckpointError: {out / 'checkpoints'}: "), proc.stderr
    # The first save into the locked directory is step 4's: its error comes by step 6's save at the latest.
    assert max(r["step"] for r in strict_records(out / "metrics.jsonl")) <= 6


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# --- 3. a non-finite gradient norm stops the run before it is saved; metrics.jsonl is strict JSON -------------------


def poisoned_grad_loss(model, batch, key):
    """The toy loss plus sqrt(p * w^2), w one embedding weight: finite for p = 1 or 0, but its gradient w/|w|
    turns 0/0 = NaN where a batch sets p = 0, so the loss stays finite while the gradients are NaN."""
    loss, n = toy_loss(model, batch, key)
    return loss + jnp.sqrt(batch["poison"][0] * model.embed[0, 0] ** 2), n


class PoisonFrom(ToyBatches):
    def __init__(self, first_bad: int):
        super().__init__()
        self.first_bad = first_bad

    def __next__(self):
        b = super().__next__()
        b["poison"] = np.full((b["input_ids"].shape[0],), 0.0 if self.i >= self.first_bad else 1.0, np.float32)
        return b


def test_nan_gradients_with_a_finite_loss_stop_before_the_save(tmp_path):
    import sid.trainer

    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=10, per_device_batch_size=2, log_every=1, save_every=2)
    run = RunDir(cfg.output_dir, cfg)
    sched = optax.constant_schedule(0.05)
    with pytest.raises(NonFiniteLoss, match=r"grad_norm nan.* at step 6; .*Last good checkpoint: 4"):
        sid.trainer.fit(
            model=toy_model(),
            loss_fn=poisoned_grad_loss,
            optimizer=optax.adam(sched),
            lr_schedule=sched,
            batches=PoisonFrom(first_bad=6),  # the 6th batch (step 6) has NaN gradients
            total_steps=10,
            cfg=cfg,
            mesh=make_mesh(MeshConfig()),
            run=run,
            tracker=Tracker(WandbConfig(), run_name="t", config={}),
        )
    assert not (tmp_path / "checkpoints" / "6").exists()
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=3)
    state, _, _ = init_state(toy_model(), optax.adam(sched), seed=0, mesh=make_mesh(MeshConfig()))
    step, restored, _ = ckpt.restore(abstract_like(state))
    ckpt.close()
    assert step == 4 and all_finite(restored)
    assert all(r["step"] <= 5 for r in strict_records(tmp_path / "metrics.jsonl"))


def test_metrics_and_summary_are_strict_json(tmp_path):
    run = RunDir(tmp_path, TrainConfig(output_dir=str(tmp_path)))
    run.append_metrics({"step": 1, "loss": float("nan"), "grad_norm": np.float32("inf"), "mfu": None})
    run.update(train={"final_loss": float("nan"), "curve": [1.0, float("-inf")]})
    assert strict_records(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": None, "grad_norm": None, "mfu": None}]
    summary = json.loads((tmp_path / "run_summary.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert summary["train"] == {"final_loss": None, "curve": [1.0, None]}


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint_and_drops_a_torn_line(tmp_path):
    run = RunDir(tmp_path, TrainConfig(output_dir=str(tmp_path)))
    for step in range(1, 6):
        run.append_metrics({"step": step, "loss": 1.0 / step})
    run.append_metrics({"step": 4, "eval_loss": 0.5})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-append
    run.truncate_metrics(4)
    assert [(r["step"], sorted(r)) for r in strict_records(tmp_path / "metrics.jsonl")] == [
        (1, ["loss", "step"]),
        (2, ["loss", "step"]),
        (3, ["loss", "step"]),
        (4, ["loss", "step"]),
        (4, ["eval_loss", "step"]),
    ]


# --- 4. results files appear whole or not at all --------------------------------------------------------------------

FULL_DISK = """
import json, resource, signal, sys
from pathlib import Path
import jax
from sid.atomic import write_text
from sid.compat.hf import export_qwen2
from sid.eval.predictions import write_predictions
from sid.models.config import ModelConfig
from sid.models.qwen2 import Qwen2
from sid.run import RunDir
from sid.config import TrainConfig

out = Path(sys.argv[1])
run = RunDir(out, TrainConfig(output_dir=str(out)))
run.update(eval={{"hr": 0.5}})
write_predictions(out / "predictions.json", ["<a_1>"], [["<a_1>", "<a_2>"]])
write_text(out / "report.md", "# old report\\n")
cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
model = Qwen2.init(cfg, key=jax.random.key(0))
export_qwen2(model, out / "model")
old_model = (out / "model" / "model.safetensors").read_bytes()

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
failed = []
for name, write in [
    ("predictions", lambda: write_predictions(out / "predictions.json", ["<a_1>"] * 9000, [["<a_2>"] * 9] * 9000)),
    ("summary", lambda: run.update(big=["x" * 100] * 1000)),
    ("report", lambda: write_text(out / "report.md", "# new report\\n" * 2000)),
    ("export", lambda: export_qwen2(Qwen2.init(cfg, key=jax.random.key(1)), out / "model")),
]:
    try:
        write()
    except Exception:  # OSError (EFBIG) from Python, safetensors' own error from its writer
        failed.append(name)
print(json.dumps({{"failed": failed, "model_kept": (out / "model" / "model.safetensors").read_bytes() == old_model}}))
"""


def test_a_full_disk_leaves_every_results_file_as_it_was(tmp_path):
    """RLIMIT_FSIZE (ulimit -f) makes each write past 8 KiB fail mid-file, as a full disk does."""
    out = tmp_path / "run"
    env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK.format(limit=8192), str(out)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"failed": ["predictions", "summary", "report", "export"], "model_kept": True}
    assert json.loads((out / "predictions.json").read_text()) == [{"output": "<a_1>", "predict": ["<a_1>", "<a_2>"]}]
    assert json.loads((out / "run_summary.json").read_text())["eval"] == {"hr": 0.5}
    assert (out / "report.md").read_text() == "# old report\n"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temporary left behind


def test_atomic_path_replaces_a_directory_and_cleans_up_after_an_error(tmp_path):
    from sid.atomic import atomic_path

    target = tmp_path / "model"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("one")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed mid-export")
    assert (target / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "b.txt").write_text("two")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"] and len(list(tmp_path.iterdir())) == 1


# --- 5. smaller ones -------------------------------------------------------------------------------------------------


def test_output_path_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    from sid.train import main

    (tmp_path / "file").write_text("")
    rc = main(["--config", SMOKE, "--train.output-dir", str(tmp_path / "file" / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"error: {tmp_path / 'file' / 'run'}: cannot write")


def test_an_empty_train_split_says_how_many_rows_were_skipped(tmp_path, capsys):
    from sid.train import main

    data = tmp_path / "data"
    shutil.copytree(TESTS / "fixtures" / "tiny", data)
    header, _, bad, _ = (data / "unknown_item.csv").read_text().splitlines()  # its second row names item 99
    (data / "all_bad.csv").write_text("\n".join([header, bad, bad.replace("u2,", "u5,", 1), bad]) + "\n")
    args = ["--config", SMOKE, "--data.source", "minionerec", "--data.dir", str(data), "--data.category"]
    args += ["Fixture", "--data.train-file", "all_bad.csv", "--data.on-bad-row", "skip"]
    args += ["--tokenizer.path", "qwen2_tokenizer", "--train.output-dir", str(tmp_path / "run")]
    rc = main(args)  # default tasks: alignment samples alone used to train and exit 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "the train split of minionerec data" in err and "has no usable rows (3 bad rows skipped" in err
    assert "all_bad.csv:2: " in err


def test_eval_rejects_negative_max_samples():
    with pytest.raises(ConfigError, match="eval.max_samples must be >= 0"):
        EvalConfig(max_samples=-115)
    with pytest.raises(ConfigError, match="max_samples"):
        from_dict(EvalConfig, {"max_samples": -1}, source="eval.yaml")
    assert EvalConfig(max_samples=0).max_samples == 0


@pytest.fixture
def recording_wandb(monkeypatch):
    """A stand-in wandb module that records init's arguments (no network, no files)."""
    calls = {}
    module = types.ModuleType("wandb")
    module.Settings = lambda **kw: kw

    def init(**kwargs):
        calls.update(kwargs)
        if kwargs["mode"] == "online":
            raise TimeoutError("init timed out")
        return types.SimpleNamespace(summary={}, log=lambda *a, **k: None, finish=lambda: None)

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_writes_under_the_run_dir_with_a_bounded_init(tmp_path, recording_wandb):
    run = RunDir(tmp_path / "run", TrainConfig(output_dir=str(tmp_path / "run")))
    Tracker(WandbConfig(mode="offline", init_timeout_s=12.0), run=run).finish()
    assert recording_wandb["dir"] == str(tmp_path / "run") and recording_wandb["name"] == "run"
    assert recording_wandb["settings"] == {"init_timeout": 12.0, "login_timeout": 12.0}
    assert json.loads((tmp_path / "run" / "run_summary.json").read_text())["wandb"] == {
        "mode": "offline",
        "logging": True,
    }
    # Asked for and unable to log: said in run_summary.json, not only in the log.
    Tracker(WandbConfig(mode="online"), run=run)
    status = json.loads((tmp_path / "run" / "run_summary.json").read_text())["wandb"]
    assert status["mode"] == "online" and status["logging"] is False and "TimeoutError" in status["why_not"]


def test_real_wandb_offline_writes_into_the_run_dir(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = RunDir(tmp_path / "run", TrainConfig(output_dir=str(tmp_path / "run")))
    tracker = Tracker(WandbConfig(mode="offline"), run=run)
    assert tracker.run is not None, "wandb offline failed to start"
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.finish()
    assert (tmp_path / "run" / "wandb").is_dir() and not (tmp_path / "wandb").exists()
    assert wandb.__version__


def test_wandb_is_installed_with_the_package():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split("==")[0].strip() == "wandb" for d in deps)


# --- kill -9 at random points, resume each time: bitwise the uninterrupted run --------------------------------------

TOY_RUN = """
import sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
import numpy as np
import jax
from test_trainer import ToyBatches, run_fit


class Slow(ToyBatches):  # a few ms per step, so that a kill lands on a step or inside a save
    def __next__(self):
        time.sleep(0.02)
        return super().__next__()


out = Path(sys.argv[1])
model, _ = run_fit(out, Slow(), steps={steps}, save_every=3, keep_checkpoints=2, resume=True)
np.savez(out / "final.npz", *[np.asarray(x) for x in jax.tree.leaves(model)])
"""


def _start(script: str, out: Path) -> subprocess.Popen:
    log = open(out.parent / f"{out.name}.log", "ab")  # a file, not a pipe nobody reads: it never fills up
    with log:  # the same 8 simulated devices as this process, so the runs compute the same floats
        return subprocess.Popen([sys.executable, "-c", script, str(out)], env=_env(), stdout=log, stderr=log)


def _tail(out: Path) -> str:
    return (out.parent / f"{out.name}.log").read_text()[-2000:]


def _logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _wait_and_kill(proc: subprocess.Popen, out: Path, kind: str, after: int, deadline: float) -> str:
    """kill -9 once `after` more steps are logged (kind 'step') or as soon as a save is in flight (kind 'save')."""
    start = _logged_steps(out)
    while proc.poll() is None and time.monotonic() < deadline:
        in_save = kind == "save" and any((out / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
        if in_save or (kind == "step" and _logged_steps(out) >= start + after):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return f"{kind} after step {_logged_steps(out)}"
        time.sleep(0.001)
    assert proc.poll() is not None or time.monotonic() < deadline, "the run never reached the kill point"
    return "finished before the kill"


def test_kill9_at_random_points_then_resume_is_bitwise(tmp_path):
    steps = 36
    script = TOY_RUN.format(tests=str(TESTS), steps=steps)
    straight, _ = run_fit(tmp_path / "straight", ToyBatches(), steps=steps, save_every=3, keep_checkpoints=2)

    rng = random.Random(23)
    out, kills = tmp_path / "killed", []
    deadline = time.monotonic() + 300
    for _ in range(5):
        proc = _start(script, out)
        kills.append(_wait_and_kill(proc, out, rng.choice(["step", "save"]), rng.randint(1, 6), deadline))
    last = _start(script, out)
    assert last.wait(timeout=120) == 0, _tail(out)

    assert sum(k.startswith(("step", "save")) for k in kills) >= 4, kills
    got = np.load(out / "final.npz")
    want = params_of(straight)
    assert len(got.files) == len(want)
    for i, leaf in enumerate(want):
        np.testing.assert_array_equal(got[f"arr_{i}"], leaf, err_msg=f"after kills {kills}")
    assert [r["step"] for r in strict_records(out / "metrics.jsonl")] == list(range(1, steps + 1))
