"""The whole SFT recipe on real data: a tiny random HF Qwen2 checkpoint (Qwen's 151,936-row embedding), the Qwen2
tokenizer plus Industrial SID tokens, training on 8 simulated devices, export, and 50-beam eval (more beams than
the 48 first-level codes), then `sid.eval` on the exported run giving the same predictions."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sid.config import load_yaml
from sid.data.minionerec import load_catalog
from sid.eval.__main__ import run_eval
from sid.jobs import EvalJob, TrainJob
from sid.train import run_train

ROOT = Path(__file__).resolve().parent.parent
QWEN_ROWS = 151_936


@pytest.fixture(scope="module")
def tiny_hf_qwen2(tmp_path_factory):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=QWEN_ROWS,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1e6,
    )
    path = tmp_path_factory.mktemp("hf") / "tiny-qwen2"
    Qwen2ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def replace(cfg, **sections):
    return dataclasses.replace(cfg, **{k: dataclasses.replace(getattr(cfg, k), **v) for k, v in sections.items()})


def test_industrial_sft_end_to_end(tmp_path, tiny_hf_qwen2, shared_data):
    data = {
        "source": "minionerec",
        "dir": "minionerec_industrial",
        "category": "Industrial_and_Scientific",
        "max_len": 256,
        "pack": True,
    }
    eval_cfg = {
        "num_beams": 50,
        "topk": (1, 10, 50),
        "per_device_batch_size": 1,
        "max_samples": 8,
        "prompt_buckets": (256, 512),
    }
    job = replace(
        load_yaml(TrainJob, ROOT / "configs/train/cpu/smoke.yaml"),
        model={"hf_path": str(tiny_hf_qwen2), "vocab_multiple": 128},
        tokenizer={"path": "qwen2_tokenizer"},
        data=data,
        tasks={"next_sid": True, "alignment": False, "fusion": False, "eval_prompt": "eval"},
        train={
            "output_dir": str(tmp_path / "run"),
            "max_steps": 2,
            "per_device_batch_size": 1,
            "grad_accum_steps": 1,
            "log_every": 1,
            "eval_loss_every": 2,
            "eval_loss_batches": 2,
        },
        eval=eval_cfg,
    )
    summary = run_train(job)

    vocab = summary["vocab_resize"]
    added = summary["token_extension"]["sid_tokens_added"]
    assert added == 560 and summary["token_extension"]["sid_levels"] == 3
    assert vocab["checkpoint_rows"] == QWEN_ROWS and vocab["new_rows"] == added
    assert vocab["tokenizer_vocab"] == vocab["tokenizer_base_vocab"] + added == vocab["valid_vocab"]
    assert vocab["rows"] % 128 == 0 and vocab["rows"] - 128 < vocab["valid_vocab"] <= vocab["rows"]
    train = summary["train"]
    for key in ("steps", "micro_steps", "effective_batch_size", "final_loss", "tokens_per_s", "wall_s", "compile_s"):
        assert train[key] is not None, key
    assert train["steps"] == 2 and train["effective_batch_size"] == 8
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    held_out = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in held_out] == [2] and 0 < held_out[0]["eval_loss"] < 20

    ev = summary["eval"]
    assert ev["n_samples"] == 8 and ev["n_beams"] == 50 and ev["invalid_prediction_count"] == 0
    assert set(ev["hr"]) == set(ev["ndcg"]) == {"1", "10", "50"}
    catalog_sids = set(load_catalog(shared_data / "minionerec_industrial", "Industrial_and_Scientific").sids.values())
    predictions = json.loads((tmp_path / "run" / "predictions.json").read_text())
    assert len(predictions) == 8
    for p in predictions:
        assert len(p["predict"]) == 50 and len(set(p["predict"])) == 50
        assert set(p["predict"]) <= catalog_sids and p["output"] in catalog_sids

    again = run_eval(
        replace(
            EvalJob(output_dir=str(tmp_path / "eval")),
            data=data,
            tasks={"eval_prompt": "eval"},
            eval={**eval_cfg, "checkpoint": str(tmp_path / "run")},
            model={"compute_dtype": job.model.compute_dtype},
        )
    )
    assert again["eval"]["hr"] == ev["hr"] and again["eval"]["ndcg"] == ev["ndcg"]
    assert json.loads((tmp_path / "eval" / "predictions.json").read_text()) == predictions


def tiny_scratch_job(tmp_path, data, tasks, eval_cfg):
    return replace(
        load_yaml(TrainJob, ROOT / "configs/train/cpu/smoke.yaml"),
        model={"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "vocab_multiple": 128},
        tokenizer={"path": "qwen2_tokenizer"},
        data=data,
        tasks=tasks,
        train={
            "output_dir": str(tmp_path / "run"),
            "max_steps": 1,
            "warmup_steps": 0,
            "per_device_batch_size": 1,
            "log_every": 1,
        },
        eval=eval_cfg,
    )


def test_bad_rows_are_skipped_and_counted_in_run_summary(tmp_path):
    fixture = ROOT / "tests/fixtures/tiny"
    data = {
        "source": "minionerec",
        "dir": str(fixture),
        "category": "Fixture",
        "train_file": "mixed_bad.csv",
        "valid_file": "good.csv",
        "test_file": "good.csv",
        "max_len": 256,
        "on_bad_row": "skip",
    }
    tasks = {"next_sid": True, "alignment": False, "fusion": False, "eval_prompt": "eval"}
    eval_cfg = {"num_beams": 5, "topk": (1, 5), "per_device_batch_size": 1, "prompt_buckets": (256,)}
    summary = run_train(tiny_scratch_job(tmp_path, data, tasks, eval_cfg))
    bad = summary["data"]["bad_rows"]
    assert summary["data"]["train_rows"] == 2 and bad["total"] == 8 and sum(bad["counts"].values()) == 8
    assert all("mixed_bad.csv:" in example for example in bad["examples"])
    assert summary["eval"]["invalid_prediction_count"] == 0

    strict = subprocess.run(
        [
            sys.executable,
            "-m",
            "sid.train",
            "--config",
            str(ROOT / "configs/train/cpu/smoke.yaml"),
            "--data.source",
            "minionerec",
            "--data.dir",
            str(fixture),
            "--data.category",
            "Fixture",
            "--data.train-file",
            "mixed_bad.csv",
            "--tokenizer.path",
            "qwen2_tokenizer",
            "--train.output-dir",
            str(tmp_path / "strict"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "XLA_FLAGS": ""},
    )
    assert strict.returncode == 2 and "Traceback" not in strict.stderr
    assert re.search(r"error: .*mixed_bad\.csv:4: field '", strict.stderr.splitlines()[-1]), strict.stderr[-500:]


def test_letter_instruments_end_to_end(tmp_path, shared_data):
    data = {"source": "letter", "dir": "letter_instruments", "category": "Instruments", "max_len": 256}
    tasks = {"next_sid": True, "alignment": False, "fusion": False, "eval_prompt": "eval"}
    eval_cfg = {
        "num_beams": 10,
        "topk": (1, 10),
        "per_device_batch_size": 1,
        "max_samples": 8,
        "prompt_buckets": (256, 512),
    }
    summary = run_train(tiny_scratch_job(tmp_path, data, tasks, eval_cfg))
    assert summary["token_extension"]["sid_levels"] == 4
    assert summary["data"]["train_rows"] == 131_837
    predictions = json.loads((tmp_path / "run" / "predictions.json").read_text())
    catalog = {
        tuple(v) for v in json.loads((shared_data / "letter_instruments/Instruments.index.json").read_text()).values()
    }
    for p in predictions:
        assert len(p["predict"]) == 10
        for sid in p["predict"]:
            assert tuple(re.findall(r"<[a-d]_\d+>", sid)) in catalog


def test_valid_ranking_during_training_equals_the_eval_of_the_same_model(tmp_path):
    """The valid split ranked during training (whole split, last step) gives the metrics that the final eval of the
    same model on the same split gives; the best step is the lowest held-out loss of metrics.jsonl."""
    fixture = ROOT / "tests/fixtures/tiny"
    data = {"source": "minionerec", "dir": str(fixture), "category": "Fixture", "max_len": 256}
    data.update(train_file="good.csv", valid_file="good.csv", test_file="good.csv")
    tasks = {"next_sid": True, "alignment": False, "fusion": False, "eval_prompt": "eval"}
    eval_cfg = {"split": "valid", "num_beams": 5, "topk": (1, 5), "per_device_batch_size": 1, "prompt_buckets": (256,)}
    job = tiny_scratch_job(tmp_path, data, tasks, eval_cfg)
    job = replace(
        job,
        train={"max_steps": 4, "eval_loss_every": 2, "eval_loss_batches": 1, "valid_rank_every": 2,
               "valid_rank_samples": 0, "select_by": "loss", "final_model": "last"},
    )  # fmt: skip
    summary = run_train(job)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    held_out = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in held_out] == [2, 4] and all("valid/ndcg@5" in r for r in held_out)
    # One task here, so its held-out loss is the whole one; the train records carry it per step too.
    assert all(r["eval_loss/next_sid"] == pytest.approx(r["eval_loss"], rel=1e-6) for r in held_out)
    train_records = [r for r in records if "loss" in r]
    assert all(r["loss/next_sid"] == pytest.approx(r["loss"], rel=1e-5) for r in train_records)
    last = held_out[-1]
    ev = summary["eval"]
    assert (last["valid/hr@1"], last["valid/hr@5"]) == (ev["hr"]["1"], ev["hr"]["5"])
    assert (last["valid/ndcg@1"], last["valid/ndcg@5"]) == (ev["ndcg"]["1"], ev["ndcg"]["5"])
    best = min(held_out, key=lambda r: r["eval_loss"])
    assert summary["train"]["best"]["step"] == best["step"]
    assert summary["train"]["best"]["value"] == best["eval_loss"]
