"""`sid.nanogpt` on the shared trainer: the CPU smoke config trains, its loss falls, outputs are written."""

import json
from dataclasses import replace
from pathlib import Path

import jax
import numpy as np

from sid.config import load_yaml
from sid.data.chars import CharData
from sid.jobs import NanoGPTJob
from sid.models.nanogpt import GPT
from sid.nanogpt import make_eval_loss, run_nanogpt
from sid.parallel.mesh import make_mesh

ROOT = Path(__file__).resolve().parent.parent


def smoke_job(tmp_path):
    job = load_yaml(NanoGPTJob, ROOT / "configs/nanogpt/cpu_smoke.yaml")
    return replace(job, train=replace(job.train, output_dir=str(tmp_path)))


def test_smoke_trains_loss_falls_and_writes_summary(tmp_path):
    summary = run_nanogpt(smoke_job(tmp_path))
    train = summary["train"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.9 * losses[0] and losses[-1] < np.log(65) - 1.0  # uniform over 65 chars: 4.17
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [30, 60]
    assert train["best_eval_loss"] == min(r["eval_loss"] for r in evals)
    assert train["best_eval_step"] in (30, 60)
    for key in ("final_train_loss", "ms_per_iter", "tokens_per_s"):
        assert train[key] > 0
    text = (tmp_path / "samples.txt").read_text()
    assert len(text) >= 100 and set(text) <= set(CharData.load(smoke_job(tmp_path).data).codec.chars)
    assert (tmp_path / "best_model.eqx").is_file()


def test_eval_loss_estimate_is_deterministic_for_a_seed(tmp_path):
    job = smoke_job(tmp_path)
    data = CharData.load(job.data)
    cfg = replace(job.model, vocab_size=data.codec.vocab_size)
    model = GPT.init(cfg, key=jax.random.key(0))
    estimate = make_eval_loss(data, job, rows=8, mesh=make_mesh(job.mesh))
    a, b = estimate(model), estimate(model)
    assert a == b
    assert np.isclose(a, np.log(data.codec.vocab_size), rtol=0.1)  # an untrained model is near uniform
