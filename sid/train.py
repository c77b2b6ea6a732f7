"""`python -m sid.train`: SID supervised fine-tuning of a Qwen2 model, then (eval.enabled) ranking evaluation.

Data → tokenizer with SID tokens → model (HF checkpoint or scratch, vocab resized and padded) → packed batches →
the shared trainer → HF export of the final model (RUN_DIR/model) → trie-constrained beam-search eval.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
from pathlib import Path

import jax

from sid.config import ConfigError
from sid.data.config import TokenizerConfig
from sid.data.pipeline import BatchPlan
from sid.data.tasks import build_sft_samples, encode_all, eval_prompts, load_split, synthetic_dir
from sid.data.tokenizer import SIDTokenizer, build_tokenizer
from sid.eval.config import EvalConfig
from sid.eval.held_out import HeldOutLoss, ValidRanking
from sid.handoff import hand_on, stage_main
from sid.jobs import RLJob, TrainJob
from sid.loss import sft_loss
from sid.mesh import data_parallel_size, init_distributed, make_mesh, tp_head_warning
from sid.models.build import build_model, num_params, token_extension, train_flops
from sid.models.qwen2 import Qwen2
from sid.paths import resolve
from sid.run import RunDir, load_dotenv
from sid.tracking import Tracker
from sid.trainer import check_output_dir, fit, make_optimizer
from sid.trainer_config import TrainConfig

log = logging.getLogger("sid")


def tokenizer_dir(cfg: TokenizerConfig, data_dir: Path, data_root: str) -> Path:
    """The tokenizer files: `tokenizer.path`, or the dataset's own directory when it is empty."""
    return data_dir if not cfg.path else resolve(cfg.path, data_root)


def dataset_dir(job, run_dir: Path | None) -> Path:
    """Where the split files are (synthetic data is written under the run directory)."""
    if job.data.source == "synthetic":
        return synthetic_dir(job.data, run_dir)
    return resolve(job.data.dir, job.data.data_root)


def load_tokenizer(cfg: TokenizerConfig, catalog, data_dir: Path, data_root: str) -> SIDTokenizer:
    path = tokenizer_dir(cfg, data_dir, data_root)
    return build_tokenizer(dataclasses.replace(cfg, path=str(path.absolute())), catalog.sid_tokens())


def sft_plan(job: TrainJob, tok: SIDTokenizer, samples, rows_per_step: int) -> BatchPlan:
    """Samples -> the batch plan of the config's layout (packed rows or length buckets)."""
    return BatchPlan(
        encode_all(samples, tok, job.data.max_len),
        rows_per_step=rows_per_step,
        max_len=job.data.max_len,
        pack=job.data.pack,
        buckets=job.data.length_buckets,
    )


def check_selection(cfg: TrainConfig, eval_cfg: EvalConfig) -> None:
    """Refuse, before anything runs, a selection that no evaluation would ever feed."""
    needs = {"loss": ("eval_loss_every", cfg.eval_loss_every), "ndcg@10": ("valid_rank_every", cfg.valid_rank_every)}
    needs["hr@10"] = needs["ndcg@10"]
    if cfg.select_by != "none" and not needs[cfg.select_by][1]:
        raise ConfigError(f"train.select_by={cfg.select_by} needs train.{needs[cfg.select_by][0]} > 0")
    if cfg.select_by in ("ndcg@10", "hr@10") and 10 not in eval_cfg.topk:
        raise ConfigError(f"train.select_by={cfg.select_by} needs 10 in eval.topk {eval_cfg.topk}")
    if cfg.early_stop_patience and cfg.select_by == "none":
        raise ConfigError("train.early_stop_patience needs train.select_by")
    for name in ("valid_rank_every", "valid_rank_samples", "early_stop_patience", "eval_loss_every"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"train.{name}={getattr(cfg, name)} must be >= 0")


def sft_evaluators(job: TrainJob | RLJob, tok: SIDTokenizer, mesh, run_dir: Path, loss_fn) -> list:
    """The held-out loss on every enabled task of the valid split, and the ranking of a fixed valid subset (the SFT
    and the RL stage's evaluators)."""
    cfg, evaluators = job.train, []
    if not (cfg.eval_loss_every or cfg.valid_rank_every):
        return evaluators
    interactions, catalog, _ = load_split(job.data, "valid", run_dir=run_dir)
    if cfg.eval_loss_every:
        samples = build_sft_samples(interactions, catalog, job.tasks, job.data.category_text)
        plan = sft_plan(job, tok, samples, cfg.per_device_batch_size * data_parallel_size(mesh))
        every, batches = cfg.eval_loss_every, cfg.eval_loss_batches
        evaluators.append(HeldOutLoss(plan, loss_fn, batches=batches, every=every, mesh=mesh))
    if cfg.valid_rank_every:
        pairs = eval_prompts(interactions, job.tasks)
        every, samples = cfg.valid_rank_every, cfg.valid_rank_samples
        ranking = ValidRanking(tok, catalog, pairs, job.eval, mesh, samples=samples, every=every, seed=cfg.seed)
        evaluators.append(ranking)
    return evaluators


def run_train(job: TrainJob) -> dict:
    """Train (and evaluate); returns run_summary.json's content."""
    init_distributed(job.mesh)
    load_dotenv()
    check_output_dir(job.train)
    check_selection(job.train, job.eval)
    run = RunDir(job.train.output_dir, job)
    tracker = Tracker(job.wandb, run=run)  # first: a W&B that was asked for and cannot log says so at once
    mesh = make_mesh(job.mesh)
    log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.devices.size, jax.devices()[0].platform)
    rows_data, catalog, bad_rows = train_split(job, run)
    tok = load_tokenizer(job.tokenizer, catalog, dataset_dir(job, run.path), job.data.data_root)
    model = _model(job, tok, mesh, run)
    run.update(data={"train_rows": len(rows_data), "bad_rows": bad_rows.as_dict()})
    samples = build_sft_samples(rows_data, catalog, job.tasks, job.data.category_text)
    global_rows = job.train.per_device_batch_size * data_parallel_size(mesh) * job.train.grad_accum_steps
    plan = sft_plan(job, tok, samples, global_rows)
    steps = job.train.max_steps or math.ceil(job.train.epochs * plan.steps_per_epoch)
    log.info(
        "data: %d samples, %d steps/epoch of %d rows, %d steps", len(samples), plan.steps_per_epoch, global_rows, steps
    )
    run.update(data={**run.summary["data"], "samples": len(samples), **plan.summary()})
    batches = plan.train_iterator(
        seed=job.train.seed, process_index=jax.process_index(), process_count=jax.process_count()
    )
    optimizer, lr = make_optimizer(job.optimizer, job.train, steps, model)
    loss_fn = functools.partial(sft_loss, label_smoothing=job.train.label_smoothing)
    model, train = fit(
        model=model, loss_fn=loss_fn, optimizer=optimizer, lr_schedule=lr, batches=batches, total_steps=steps,
        cfg=job.train, mesh=mesh, run=run, tracker=tracker, flops=train_flops(model, job.data.max_len),
        evaluators=sft_evaluators(job, tok, mesh, run.path, sft_loss),  # held-out loss without smoothing
    )  # fmt: skip
    run.update(train={**train, "effective_batch_size": global_rows, "steps_per_epoch": plan.steps_per_epoch})
    hand_on(job, model, train, tok, mesh, run, tracker)
    return run.summary


def train_split(job, run: RunDir):
    """The train split's rows, catalog and skipped rows; no usable row is an error (else the alignment samples alone
    would train, or the batch plan fail without saying why)."""
    rows_data, catalog, bad_rows = load_split(job.data, "train", run_dir=run.path)
    if not rows_data:
        first = f"; the first: {bad_rows.examples[0]}" if bad_rows.examples else ""
        raise ConfigError(
            f"the train split of {job.data.source} data in {job.data.dir} has no usable rows "
            f"({bad_rows.total} bad rows skipped: {bad_rows.counts}{first})"
        )
    return rows_data, catalog, bad_rows


def _model(job: TrainJob, tok: SIDTokenizer, mesh, run: RunDir) -> Qwen2:
    """The configured model with the tokenizer's vocab (HF checkpoint or scratch), logged and recorded."""
    model, vocab_resize = build_model(job.model, tok)
    log.info(
        "model: %.1fM params, vocab %d rows (%d real); tokenizer %d base + %d SID tokens",
        num_params(model) / 1e6,
        vocab_resize["rows"],
        model.valid_vocab,
        tok.base_vocab_size,
        tok.vocab_size - tok.base_vocab_size,
    )
    if warning := tp_head_warning(mesh.shape["tp"], heads=model.config.num_heads, kv_heads=model.config.num_kv_heads):
        log.warning(warning)
    run.update(token_extension=token_extension(tok), vocab_resize=vocab_resize)
    return model


def main(argv: list[str] | None = None) -> int:
    return stage_main(TrainJob, run_train, argv)


if __name__ == "__main__":
    sys.exit(main())
