"""`python -m sid.eval`: rank a split with trie-constrained beam search and report HR@K / NDCG@K.

`--eval.checkpoint RUN_DIR` evaluates a training run's exported model (RUN_DIR/model, an HF directory with the
SID tokenizer); an HF directory works too. Without it, the job's own model section is evaluated.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from sid.compat.hf import load_qwen2
from sid.config import run_cli
from sid.data.config import TokenizerConfig
from sid.data.dataset import dataset_dir, load_split, load_tokenizer
from sid.eval.runner import evaluate
from sid.jobs import EvalJob
from sid.models.build import build_model
from sid.models.qwen2 import pad_vocab, unpad_vocab
from sid.parallel.distributed import init_distributed
from sid.parallel.mesh import make_mesh
from sid.run import RunDir, load_dotenv
from sid.tracking import Tracker

log = logging.getLogger("sid")


def checkpoint_dir(path: str) -> Path:
    """The HF model directory of a run directory (RUN_DIR/model) or an HF directory itself."""
    p = Path(path)
    for candidate in (p / "model", p):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"{p}: neither {p / 'model'} nor {p} holds an HF model (config.json); "
        "set --eval.checkpoint to a training run directory or an exported HF directory"
    )


def run_eval(job: EvalJob) -> dict:
    """Evaluate; returns run_summary.json's content."""
    init_distributed(job.mesh)
    load_dotenv()
    run = RunDir(job.output_dir, job, log_name="eval.log")
    mesh = make_mesh(job.mesh)
    split = load_split(job.data, job.eval.split, run_dir=run.path)
    catalog = split[1]
    if job.eval.checkpoint:
        model_dir = checkpoint_dir(job.eval.checkpoint)
        log.info("evaluating %s", model_dir)
        tok = load_tokenizer(TokenizerConfig(path=str(model_dir.absolute())), catalog, model_dir, "")
        model, _ = load_qwen2(model_dir, job.model)
        if model.valid_vocab != tok.vocab_size:
            raise ValueError(
                f"{model_dir}: the model has {model.valid_vocab} real tokens but its tokenizer "
                f"{tok.vocab_size} with this catalog's SID tokens: wrong data for this checkpoint?"
            )
        model = pad_vocab(unpad_vocab(model), job.model.vocab_multiple)
    else:
        tok = load_tokenizer(job.tokenizer, catalog, dataset_dir(job.data, run.path), job.data.data_root)
        pretrained = load_qwen2(job.model.hf_path, job.model)[0] if job.model.hf_path else None
        model, _ = build_model(job.model, tok, pretrained)
    tracker = Tracker(job.wandb, run_name=run.path.name, config=run.summary["config"], enabled=run.main)
    metrics = evaluate(model, tok, job.data, job.tasks, job.eval, mesh=mesh, run=run, tracker=tracker, split_data=split)
    run.update(eval=metrics)
    tracker.summary({f"eval/HR@{k}": v for k, v in metrics["hr"].items()})
    tracker.finish()
    return run.summary


def main(argv: list[str] | None = None) -> int:
    return run_cli(EvalJob, run_eval, argv)


if __name__ == "__main__":
    sys.exit(main())
