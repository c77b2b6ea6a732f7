"""Presets validate; bad YAML names the file and key; flags override presets; --help lists every field."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sid.config import ConfigError, cli, from_dict, load_yaml
from sid.jobs import EvalJob, IndexJob, NanoGPTJob, RLJob, TrainJob

# A bare environment (no user settings leak in), keeping PYTHONPATH for checkouts run without installing.
CHILD_ENV = {"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"} | (
    {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}
)

ROOT = Path(__file__).resolve().parent.parent
JOB_FOR_DIR = {"train": TrainJob, "eval": EvalJob, "nanogpt": NanoGPTJob, "index": IndexJob, "rl": RLJob}
PRESETS = sorted((ROOT / "configs").rglob("*.yaml"))


def leaf_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (
            isinstance(f.type, str)
            and f.default_factory is not dataclasses.MISSING
            and dataclasses.is_dataclass(f.default_factory())
        ):
            yield from leaf_fields(type(f.default_factory()), prefix + f.name + ".")
        else:
            yield prefix + f.name


def test_there_are_presets_for_every_job():
    dirs = {p.relative_to(ROOT / "configs").parts[0] for p in PRESETS}
    assert dirs == set(JOB_FOR_DIR)
    names = {p.name for p in PRESETS}
    assert "sid_sft_qwen25_1p5b_base_industrial_v6e8_e3_muon_lr3e3_aux3e4.yaml" in names
    assert "sid_sft_qwen25_1p5b_base_industrial_v6e8_e3_adamw_lr3e4.yaml" in names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_preset_validates(path):
    job = JOB_FOR_DIR[path.relative_to(ROOT / "configs").parts[0]]
    cfg = load_yaml(job, path)
    assert isinstance(cfg, job)
    if isinstance(cfg, (TrainJob, RLJob)):
        assert cfg.eval.num_beams >= max(cfg.eval.topk)


RL_ON_SFT = {
    "rl/gpu/letter_instruments.yaml": "train/gpu/letter_instruments.yaml",
    "rl/cpu/letter_instruments_tiny.yaml": "train/cpu/letter_instruments_tiny.yaml",
    "rl/cpu/letter_instruments_quality.yaml": "train/cpu/letter_instruments_quality.yaml",
    "rl/cpu/smoke.yaml": "train/cpu/smoke.yaml",
    "rl/industrial.yaml": "train/v6e-8/sid_sft_qwen25_1p5b_base_industrial_v6e8_e3_adamw_lr3e4.yaml",
}


@pytest.mark.parametrize("rl_preset", RL_ON_SFT)
def test_rl_presets_start_from_their_sft_presets_run(rl_preset):
    """rl.init is the SFT preset's output_dir, and the catalog, tokenizer, prompt wording and test protocol are the
    SFT run's: its export then loads with its SID tokens, and its test metrics compare with the RL run's."""
    rl, sft = (
        load_yaml(RLJob, ROOT / "configs" / rl_preset),
        load_yaml(TrainJob, ROOT / "configs" / RL_ON_SFT[rl_preset]),
    )
    assert rl.rl.init == sft.train.output_dir
    # data.pack is how SFT batches its rows: RL rolls out prompts and never reads it.
    assert dataclasses.replace(rl.data, pack=sft.data.pack) == sft.data
    assert (rl.tokenizer, rl.tasks, rl.eval) == (sft.tokenizer, sft.tasks, sft.eval)


def test_seed_recipe_values():
    cfg = load_yaml(
        TrainJob, ROOT / "configs/train/v6e-8/sid_sft_qwen25_1p5b_base_industrial_v6e8_e3_muon_lr3e3_aux3e4.yaml"
    )
    assert (cfg.optimizer.name, cfg.train.learning_rate, cfg.train.aux_learning_rate) == ("muon_local", 3e-3, 3e-4)
    assert (cfg.train.warmup_steps, cfg.train.clip_norm, cfg.train.epochs) == (20, 1.0, 3.0)
    assert cfg.train.per_device_batch_size * 8 * cfg.train.grad_accum_steps == 1024
    assert (cfg.tasks.next_sid, cfg.tasks.alignment, cfg.tasks.fusion, cfg.tasks.title_history) == (
        True,
        True,
        True,
        False,
    )


def write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_unknown_key_names_file_and_key(tmp_path):
    p = write(tmp_path, "train:\n  lerning_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'train\.lerning_rate'"):
        load_yaml(TrainJob, p)
    with pytest.raises(ConfigError, match=r"unknown key 'nonsense'"):
        load_yaml(TrainJob, write(tmp_path, "nonsense: 1\n"))


def test_wrong_type_names_file_and_key(tmp_path):
    with pytest.raises(ConfigError, match=r"bad\.yaml: key 'train\.max_steps': expected an integer, got str"):
        load_yaml(TrainJob, write(tmp_path, "train:\n  max_steps: ten\n"))
    with pytest.raises(ConfigError, match=r"key 'model\.tie_word_embeddings': expected true/false"):
        load_yaml(TrainJob, write(tmp_path, "model:\n  tie_word_embeddings: 1\n"))
    with pytest.raises(ConfigError, match=r"key 'eval\.topk\[1\]': expected an integer"):
        load_yaml(TrainJob, write(tmp_path, "eval:\n  topk: [1, x]\n"))
    with pytest.raises(ConfigError, match=r"key 'train': expected a mapping"):
        load_yaml(TrainJob, write(tmp_path, "train: 3\n"))


def test_bad_enum_names_file_key_and_choices(tmp_path):
    with pytest.raises(
        ConfigError, match=r"bad\.yaml: key 'optimizer\.name': 'sgd' is not one of 'adamw', 'muon_local'"
    ):
        load_yaml(TrainJob, write(tmp_path, "optimizer:\n  name: sgd\n"))


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(TrainJob, write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(TrainJob, tmp_path / "missing.yaml")


def test_floats_accept_ints_and_exponent_strings():
    cfg = from_dict(TrainJob, {"train": {"learning_rate": "1e-3", "clip_norm": 2}})
    assert cfg.train.learning_rate == 1e-3 and cfg.train.clip_norm == 2.0


def test_flag_overrides_preset():
    preset = str(ROOT / "configs/train/cpu/smoke.yaml")
    cfg = cli(TrainJob, args=["--config", preset, "--train.learning-rate", "1e-3", "--optimizer.name", "muon_local"])
    base = load_yaml(TrainJob, preset)
    assert cfg.train.learning_rate == 1e-3 and cfg.optimizer.name == "muon_local"
    assert cfg.train.max_steps == base.train.max_steps and cfg.model == base.model


def test_bad_flag_value_is_rejected():
    with pytest.raises(SystemExit):
        cli(TrainJob, args=["--optimizer.name", "sgd"])


@pytest.mark.parametrize("module,job", [("sid.train", TrainJob), ("sid.eval", EvalJob), ("sid.nanogpt", NanoGPTJob)])
def test_help_lists_every_field_with_its_docstring(module, job):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", **CHILD_ENV},
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for name in leaf_fields(job):
        assert "--" + name.replace("_", "-") in text, name
    assert "Peak learning rate" in text or module == "sid.eval"
    assert "--config" in text


def test_cli_reports_a_bad_preset_in_one_line(tmp_path):
    bad = write(tmp_path, "train:\n  lerning_rate: 1.0e-3\n")
    out = subprocess.run(
        [sys.executable, "-m", "sid.train", "--config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=CHILD_ENV,
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        == f"error: {bad}: unknown key 'train.lerning_rate' (known keys in this section: "
        + ", ".join(f.name for f in dataclasses.fields(TrainJob().train.__class__))
        + ")"
    )
    assert "Traceback" not in out.stderr


def test_cli_reports_missing_data_in_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sid.train",
            "--config",
            str(ROOT / "configs/train/cpu/smoke.yaml"),
            "--data.source",
            "minionerec",
            "--data.dir",
            str(tmp_path / "nowhere"),
            "--train.output-dir",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=CHILD_ENV,
    )
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: index file ") and str(tmp_path / "nowhere") in last
    assert "Traceback" not in out.stderr
