"""`python -m sid.rl` end to end on a 16-item synthetic catalog: GRPO raises the reward and the valid HR of an SFT
model trained wrong on purpose, upstream's options run, resume after SIGTERM is bitwise equal to an uninterrupted
run, and a bad `rl.init` fails with one line (exit 2)."""

import csv
import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from tiny import tiny_qwen2

from sid.compat.hf import export_qwen2, load_qwen2
from sid.config import MeshConfig
from sid.data.config import DataConfig, TasksConfig, TokenizerConfig
from sid.data.dataset import load_split, load_tokenizer, synthetic_dir
from sid.data.synthetic import write_synthetic
from sid.data.tasks import eval_prompts
from sid.eval.config import EvalConfig
from sid.eval.runner import Ranker
from sid.models.build import build_model
from sid.models.qwen2 import pad_vocab, unpad_vocab
from sid.parallel.mesh import make_mesh
from sid.rl.__main__ import main
from sid.rl.source import RolloutSource
from sid.stage import PREEMPTED_EXIT_CODE
from sid.train import main as sft_main

ROOT = Path(__file__).resolve().parent.parent
SMOKE = str(ROOT / "configs/rl/cpu/smoke.yaml")
ITEMS, USERS = 16, 2  # 19 train prompts: each is rolled out several times in a few steps
ONE_DEVICE = MeshConfig(dp=1, fsdp=1)  # the fastest mesh on a CPU; the resume test runs over fsdp=2
TINY = tiny_qwen2(
    vocab_size=0, hidden_size=64, intermediate_size=128, vocab_multiple=64, compute_dtype="bfloat16", remat="full"
)


def export_untrained(out: Path, *, sid_tokens: bool = True) -> Path:
    """An untrained tiny Qwen2 for the synthetic catalog, exported as an SFT run directory (`out/model`); without
    `sid_tokens` its vocab is the base tokenizer's, which has no row for the catalog's SID tokens."""
    data = DataConfig(source="synthetic", dir="data", synthetic_items=ITEMS, synthetic_users=USERS)
    _, catalog, _ = load_split(data, "train", run_dir=out)
    tok = load_tokenizer(TokenizerConfig(path="", add_sid_tokens=sid_tokens), catalog, synthetic_dir(data, out), "")
    model, _ = build_model(TINY, tok)
    export_qwen2(model, out / "model", tok.tokenizer, eos_token=tok.tokenizer.id_to_token(tok.eos_id))
    return out


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    return export_untrained(tmp_path_factory.mktemp("sft"))


def rl_args(init: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", SMOKE, "--rl.init", str(init), "--train.output-dir", str(out), "--eval.no-enabled",
        "--train.valid-rank-every", "0", "--train.select-by", "none", "--data.synthetic-items", str(ITEMS),
        "--data.synthetic-users", str(USERS), "--rl.prompts-per-step", "8", "--train.log-every", "1",
        "--train.schedule", "constant", *extra,
    ]  # fmt: skip


def records(run: Path) -> dict[int, dict]:
    """metrics.jsonl's records per step (a step's training and held-out records merged) without the wall-clock
    figures."""
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.setdefault(r["step"], {}).update(
            {k: v for k, v in r.items() if k not in ("tokens_per_s", "step_time_s", "mfu")}
        )
    return out


def hit_rate(model_dir: Path, run_dir: Path, split: str, group: int, users: int = USERS) -> float:
    """HR@group of `sid.eval`'s ranker (`group` beams) over every prompt of `split`: on the train split, the mean
    `rule` reward of a `group`-beam rollout."""
    data = DataConfig(source="synthetic", dir="data", synthetic_items=ITEMS, synthetic_users=users)
    rows, catalog, _ = load_split(data, split, run_dir=run_dir)
    tok = load_tokenizer(TokenizerConfig(path=""), catalog, synthetic_dir(data, run_dir), "")
    model, _ = load_qwen2(model_dir, dataclasses.replace(TINY, compute_dtype="float32", remat="none"))
    pairs = eval_prompts(rows, TasksConfig(eval_prompt="train"))
    cfg = EvalConfig(num_beams=group, topk=(group,), per_device_batch_size=1, prompt_buckets=(128, 256))
    ranker = Ranker(tok, catalog, [p for p, _ in pairs], cfg, make_mesh(ONE_DEVICE), desc=split)
    predictions = ranker(pad_vocab(unpad_vocab(model), TINY.vocab_multiple))
    return float(np.mean([t in ranked for (_, t), ranked in zip(pairs, predictions, strict=True)]))


def shifted_sft_run(out: Path, users: int) -> Path:
    """An SFT run trained wrong on purpose (`out/sft`): on the synthetic catalog's train split with every row's
    target replaced by the user's following item, so the model learns to skip one item of the walk (the rows whose
    target has no following train row are dropped). Same catalog and tokenizer as the RL run's synthetic data."""
    data = write_synthetic(out / "shifted", num_items=ITEMS, num_users=users, category=DataConfig().category)
    with open(data / "train.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    user, target = header.index("user_id"), [header.index(c) for c in ("item_title", "item_id", "item_sid")]
    shifted = [[nxt[i] if i in target else v for i, v in enumerate(row)]
               for row, nxt in zip(rows[:-1], rows[1:], strict=True) if row[user] == nxt[user]]  # fmt: skip
    with open(data / "train.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *shifted])
    args = ["--config", str(ROOT / "configs/train/cpu/smoke.yaml"), "--data.source", "minionerec", "--data.dir",
            str(data), "--data.category", DataConfig().category, "--data.train-file", "train.csv",
            "--train.output-dir", str(out / "sft"), "--train.max-steps", "200", "--train.learning-rate", "1e-2",
            "--train.per-device-batch-size", "4", "--train.grad-accum-steps", "1", "--eval.no-enabled",
            "--tasks.no-alignment", "--tasks.no-fusion", "--tasks.no-title-history", "--mesh.dp", "1",
            "--mesh.fsdp", "1"]  # fmt: skip
    assert sft_main(args) == 0
    return out / "sft"


def test_grpo_fixes_an_sft_model_trained_wrong_on_purpose(tmp_path):
    """The SFT model above puts the true next item among its 8 beams for 48 of the 79 train prompts and 3 of the 12
    valid ones. 120 GRPO steps with the `rule` reward (1 for the target) over 8-beam groups raise both: the mean
    reward of an 8-beam rollout over every train prompt (its HR@8) and the valid HR@8, by `sid.eval`'s ranker;
    the in-training valid ranking logs the valid metrics."""
    users, out = 12, tmp_path / "rl"
    sft = shifted_sft_run(tmp_path, users)
    args = ("--rl.reward", "rule", "--rl.group-size", "8", "--train.max-steps", "120", "--train.learning-rate", "1e-3",
            "--train.aux-learning-rate", "1e-3", "--data.synthetic-users", str(users), "--mesh.dp", "1",
            "--mesh.fsdp", "1", "--train.valid-rank-every", "60", "--train.log-every", "10")  # fmt: skip
    assert main(rl_args(sft, out, *args)) == 0
    hr = {(split, m): hit_rate(d / "model", out, split, 8, users) for split in ("train", "valid")
          for m, d in (("sft", sft), ("rl", out))}  # fmt: skip
    print({k: round(v, 3) for k, v in hr.items()})
    # measured: train 48/79 -> 56/79, valid 3/12 -> 8/12
    assert hr["train", "rl"] - hr["train", "sft"] >= 4 / 79 - 1e-9
    assert hr["valid", "rl"] - hr["valid", "sft"] >= 3 / 12 - 1e-9
    logged = records(out)
    assert {"kl", "rollout/reward_mean", "rollout/reward_std", "rollout/zero_advantage_fraction",
            "rollout/group_hit_rate", "valid/hr@10", "valid/ndcg@10"} <= set(logged[60]) & set(logged[120])  # fmt: skip
    # With `rule`, a group's mean reward is 1/G when it holds the target once (beams never repeat a SID).
    rollouts = [r for r in logged.values() if "kl" in r]
    assert all(r["rollout/reward_mean"] == pytest.approx(r["rollout/group_hit_rate"] / 8) for r in rollouts)


@pytest.mark.parametrize("alpha, preempt_at", [(1.0, 2), (0.6, 3)])
def test_resume_after_sigterm_is_bitwise_equal_to_an_uninterrupted_run(
    sft_run, tmp_path, monkeypatch, alpha, preempt_at
):
    """Sampled rollouts (keys from (seed, step)) and a reference synced every 2 steps (a copy of the policy, or
    mixed into the reference with alpha 0.6): preempted after step 2 (at a sync: the copy is re-made from the
    resumed policy) or 3 (between syncs: step 2's saved reference is restored), the resumed run logs the same steps
    and exports the same model, bit for bit."""
    extra = ("--rl.rollout", "sample", "--rl.temperature", "1.5", "--rl.ref-sync-every", "2", "--rl.ref-sync-alpha",
             str(alpha), "--train.max-steps", "5", "--mesh.dp", "1", "--mesh.fsdp", "2")  # fmt: skip
    assert main(rl_args(sft_run, tmp_path / "straight", *extra)) == 0
    assert sorted(int(p.name) for p in (tmp_path / "straight" / "reference").iterdir()) == [2, 4]

    draw = RolloutSource.__next__

    def preempted(self):
        if self.step == preempt_at - 1:  # drawing this step's batch: the step runs, then the trainer saves and stops
            os.kill(os.getpid(), signal.SIGTERM)
        return draw(self)

    monkeypatch.setattr(RolloutSource, "__next__", preempted)
    assert main(rl_args(sft_run, tmp_path / "run", *extra)) == PREEMPTED_EXIT_CODE
    summary = json.loads((tmp_path / "run" / "run_summary.json").read_text())
    assert summary["train"]["preempted_at"] == preempt_at and not (tmp_path / "run" / "model").exists()
    monkeypatch.setattr(RolloutSource, "__next__", draw)
    assert main(rl_args(sft_run, tmp_path / "run", *extra, "--train.resume")) == 0

    got, want = records(tmp_path / "run"), records(tmp_path / "straight")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    assert got == want
    assert any(r["kl"] > 0 for r in want.values()) and all(r["completion_length"] == 5 for r in want.values())
    weights = "model/model.safetensors"
    assert (tmp_path / "run" / weights).read_bytes() == (tmp_path / "straight" / weights).read_bytes()


def test_upstream_options_every_prompt_set_add_gt_and_dynamic_sampling(sft_run, tmp_path):
    """All four prompt sets rolled out in two chunks by length, sampled with dynamic sampling, the target put last
    in every group: every group then holds the target, the summary counts each set's prompts."""
    out = tmp_path / "rl"
    args = ("--rl.prompts", "next_sid", "title2sid", "description2sid", "title_history",
            "--rl.title-history-samples", "5",
            "--rl.rollout", "sample", "--rl.dynamic-sampling", "--rl.add-gt", "--rl.group-size", "4",
            "--rl.reward", "rule", "--rl.rollout-chunks", "2",
            "--train.max-steps", "2", "--mesh.dp", "1", "--mesh.fsdp", "1")  # fmt: skip
    assert main(rl_args(sft_run, out, *args)) == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["rl"]["prompts"] == {
        "next_sid": 19,
        "title2sid": ITEMS,
        "description2sid": ITEMS,
        "title_history": 5,
    }
    logged = records(out)
    assert sorted(logged) == [1, 2] and all(r["rollout/group_hit_rate"] == 1.0 for r in logged.values())


def test_an_init_without_a_model_fails_with_one_line(tmp_path, capsys):
    (tmp_path / "sft").mkdir()
    assert main(rl_args(tmp_path / "sft", tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rl.init=" in err[0] and "no model there" in err[0] and "Traceback" not in err[0]


def test_a_checkpoint_whose_vocab_lacks_the_catalogs_sid_tokens_fails_with_one_line(tmp_path, capsys):
    init = export_untrained(tmp_path / "base_vocab", sid_tokens=False)
    assert main(rl_args(init / "model", tmp_path / "out")) == 2  # an HF directory itself works as rl.init too
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "SID tokens" in err and "beyond the checkpoint's" in err and err.startswith("error: ")


@pytest.mark.parametrize(
    ("flag", "named"),
    [("--train.grad-accum-steps", "grad_accum_steps=3"), ("--rl.rollout-chunks", "rl.rollout_chunks=3")],
)
def test_prompts_that_do_not_split_into_micro_batches_or_chunks_fail_with_one_line(
    sft_run, tmp_path, capsys, flag, named
):
    """Micro-batches and rollout chunks split the prompts (8 into 3 cannot)."""
    assert main(rl_args(sft_run, tmp_path / "out", flag, "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "rl.prompts_per_step=8" in err and named in err
