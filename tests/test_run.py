"""The run directory, .env secrets and W&B degradation."""

import json
import logging
import os
import sys
import types

import pytest

from sid.config import TrainConfig, WandbConfig
from sid.run import RunDir, load_dotenv
from sid.tracking import Tracker


def test_dotenv_sets_missing_variables_only(tmp_path, monkeypatch):
    first, second = tmp_path / "repo.env", tmp_path / "home.env"
    first.write_text("# comment\nSID_TEST_KEY=from-repo\r\nexport SID_TEST_QUOTED='a b'  \nSID_TEST_SET=repo\n")
    second.write_text("SID_TEST_KEY=from-home\nSID_TEST_HOME=home\n")
    monkeypatch.setenv("SID_TEST_SET", "already")
    for name in ("SID_TEST_KEY", "SID_TEST_QUOTED", "SID_TEST_HOME"):
        monkeypatch.delenv(name, raising=False)
    names = load_dotenv([first, second])
    assert os.environ["SID_TEST_KEY"] == "from-repo"  # the repo's .env wins over ~/.env
    assert os.environ["SID_TEST_QUOTED"] == "a b"
    assert os.environ["SID_TEST_HOME"] == "home"
    assert os.environ["SID_TEST_SET"] == "already"  # never overridden
    assert sorted(names) == ["SID_TEST_HOME", "SID_TEST_KEY", "SID_TEST_QUOTED"]


def test_run_dir_writes_config_log_and_summary(tmp_path):
    cfg = TrainConfig(output_dir=str(tmp_path / "run"))
    run = RunDir(cfg.output_dir, cfg)
    logging.getLogger("sid").info("hello log")
    run.update(train={"steps": 3})
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["config"]["output_dir"] == cfg.output_dir
    assert summary["train"] == {"steps": 3}
    assert "jax" in summary["versions"] and "python" in summary["versions"]
    assert "git_sha" in summary
    assert "output_dir: " in (tmp_path / "run" / "config_resolved.yaml").read_text()
    assert "hello log" in (tmp_path / "run" / "train.log").read_text()


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    calls = {"init": 0, "log": []}

    def init(**kwargs):
        calls["init"] += 1
        if kwargs["mode"] == "online":
            raise ConnectionError("network unreachable")
        run = types.SimpleNamespace(summary={}, finish=lambda: None)
        run.log = lambda metrics, step: calls["log"].append((step, metrics))
        return run

    module.init = init
    module.Settings = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_init_failure_degrades_to_disabled_with_one_warning(fake_wandb, monkeypatch):
    warnings = []
    monkeypatch.setattr("sid.tracking.log.warning", lambda msg, *a: warnings.append(msg % a if a else msg))
    tracker = Tracker(WandbConfig(mode="online"), run_name="r", config={})
    tracker.log({"train/loss": 1.0}, step=1)
    tracker.summary({"x": 1.0})
    tracker.finish()
    assert len(warnings) == 1 and "continuing with W&B disabled" in warnings[0]
    assert fake_wandb["init"] == 1 and fake_wandb["log"] == []


def test_wandb_offline_logs_and_disabled_never_imports(fake_wandb, monkeypatch):
    tracker = Tracker(WandbConfig(mode="offline"), run_name="r", config={})
    tracker.log({"train/loss": 1.0}, step=3)
    assert fake_wandb["log"] == [(3, {"train/loss": 1.0})]
    monkeypatch.delitem(sys.modules, "wandb")
    monkeypatch.setattr("builtins.__import__", _no_wandb_import(__import__))
    Tracker(WandbConfig(mode="disabled"), run_name="r", config={}).log({"x": 1.0}, step=0)


def _no_wandb_import(real):
    def guarded(name, *args, **kwargs):
        if name == "wandb":
            raise AssertionError("wandb imported while disabled")
        return real(name, *args, **kwargs)

    return guarded
