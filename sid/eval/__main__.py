"""`python -m sid.eval`: rank a split with trie-constrained beam search and report HR@K / NDCG@K.

`--eval.checkpoint RUN_DIR` evaluates a training run's exported model (RUN_DIR/model, an HF directory with the
SID tokenizer); when that is missing or damaged, the run's newest intact orbax checkpoint, with one warning. An HF
directory or one checkpoint step's directory (RUN_DIR/checkpoints/STEP) works too. Without it, the job's own model
section is evaluated.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import equinox as eqx

from sid.checkpoint import Checkpointer, abstract_like, error_line
from sid.compat.hf import hf_model_dir, load_qwen2
from sid.compile_cache import enable_compilation_cache
from sid.config import ConfigError, load_yaml, run_cli
from sid.data.config import TokenizerConfig
from sid.data.dataset import dataset_dir, load_split, load_tokenizer
from sid.eval.runner import evaluate
from sid.jobs import EvalJob, TrainJob
from sid.models.build import build_model
from sid.models.qwen2 import pad_vocab, unpad_vocab
from sid.parallel.distributed import init_distributed
from sid.parallel.mesh import make_mesh
from sid.run import RunDir, load_dotenv
from sid.tracking import Tracker
from sid.trainer import CHECKPOINT_DIR

log = logging.getLogger("sid")


def checkpoint_dir(path: str) -> Path:
    """The HF model directory of a run directory (RUN_DIR/model) or an HF directory itself."""
    p = Path(path)
    if directory := hf_model_dir(p):
        return directory
    raise FileNotFoundError(
        f"{p}: neither {p / 'model'} nor {p} holds an HF model (config.json); "
        "set --eval.checkpoint to a training run directory or an exported HF directory"
    )


def load_checkpoint(job: EvalJob, catalog):
    """(model, tokenizer) of `--eval.checkpoint`: a run directory's exported model or an HF directory; else, or
    when that does not load, the newest intact orbax checkpoint of the run (or the step directory given)."""
    path = Path(job.eval.checkpoint)
    step_dir = path.parent.name == CHECKPOINT_DIR and path.name.isdigit()
    if not step_dir:
        try:
            return _load_exported(checkpoint_dir(str(path)), job, catalog)
        except Exception as e:
            if not (path / CHECKPOINT_DIR).is_dir():
                raise ConfigError(f"{path}: cannot load its model ({error_line(e)})") from e
            log.warning("%s: %s; evaluating its newest intact checkpoint instead", path, error_line(e))
    run_dir = path.parent.parent if step_dir else path
    return _load_orbax(run_dir, int(path.name) if step_dir else None, job, catalog)


def _check_vocab(model, tok, where: Path) -> None:
    if model.valid_vocab != tok.vocab_size:
        raise ValueError(
            f"{where}: the model has {model.valid_vocab} real tokens but its tokenizer "
            f"{tok.vocab_size} with this catalog's SID tokens: wrong data for this checkpoint?"
        )


def _load_exported(model_dir: Path, job: EvalJob, catalog):
    log.info("evaluating %s", model_dir)
    tok = load_tokenizer(TokenizerConfig(path=str(model_dir.absolute())), catalog, model_dir, "")
    model, _ = load_qwen2(model_dir, job.model)
    _check_vocab(model, tok, model_dir)
    return pad_vocab(unpad_vocab(model), job.model.vocab_multiple), tok


def _load_orbax(run_dir: Path, step: int | None, job: EvalJob, catalog):
    """Rebuild the run's model from its config_resolved.yaml, then restore only its params from a checkpoint."""
    config = run_dir / "config_resolved.yaml"
    if not config.is_file():
        raise ConfigError(f"{run_dir}: no config_resolved.yaml, so its checkpoints' model cannot be rebuilt")
    train = load_yaml(TrainJob, config)
    tok = load_tokenizer(train.tokenizer, catalog, dataset_dir(train.data, run_dir), train.data.data_root)
    # The architecture is the run's; how to compute (dtype, remat, kernels) is this job's.
    runtime = ("compute_dtype", "remat", "scan_unroll", "attention")
    model_cfg = dataclasses.replace(train.model, **{k: getattr(job.model, k) for k in runtime})
    params, static = eqx.partition(build_model(model_cfg, tok)[0], eqx.is_array)
    ckpt = Checkpointer(run_dir / CHECKPOINT_DIR, keep=None, read_only=True)
    step, params = ckpt.restore_params(abstract_like(params), step)
    log.info("evaluating checkpoint step %d of %s", step, run_dir)
    model = eqx.combine(params, static)
    _check_vocab(model, tok, run_dir / CHECKPOINT_DIR / str(step))
    return pad_vocab(unpad_vocab(model), job.model.vocab_multiple), tok


def run_eval(job: EvalJob) -> dict:
    """Evaluate; returns run_summary.json's content."""
    init_distributed(job.mesh)
    load_dotenv()
    enable_compilation_cache()
    run = RunDir(job.output_dir, job, log_name="eval.log")
    tracker = Tracker(job.wandb, run=run)  # first: a W&B that was asked for and cannot log says so at once
    mesh = make_mesh(job.mesh)
    split = load_split(job.data, job.eval.split, run_dir=run.path)
    catalog = split[1]
    if job.eval.checkpoint:
        model, tok = load_checkpoint(job, catalog)
    else:
        tok = load_tokenizer(job.tokenizer, catalog, dataset_dir(job.data, run.path), job.data.data_root)
        pretrained = load_qwen2(job.model.hf_path, job.model)[0] if job.model.hf_path else None
        model, _ = build_model(job.model, tok, pretrained)
    metrics = evaluate(model, tok, job.data, job.tasks, job.eval, mesh=mesh, run=run, tracker=tracker, split_data=split)
    run.update(eval=metrics)
    tracker.summary({f"eval/HR@{k}": v for k, v in metrics["hr"].items()})
    tracker.finish()
    return run.summary


def main(argv: list[str] | None = None) -> int:
    return run_cli(EvalJob, run_eval, argv)


if __name__ == "__main__":
    sys.exit(main())
