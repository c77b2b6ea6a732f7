"""`python -m sid.train`: SID supervised fine-tuning of a Qwen2 model, then (eval.enabled) ranking evaluation.

Data → tokenizer with SID tokens → model (HF checkpoint or scratch, vocab resized and padded) → packed batches →
the shared trainer → HF export of the final model (RUN_DIR/model) → trie-constrained beam-search eval.
"""

from __future__ import annotations

import functools
import logging
import math
import sys

import jax

from sid.compat.hf import load_qwen2
from sid.data.dataset import dataset_dir, load_tokenizer, load_train_split
from sid.data.tasks import build_sft_samples, sft_plan
from sid.data.tokenizer import SIDTokenizer
from sid.eval.held_out import sft_evaluators
from sid.jobs import TrainJob
from sid.loss import sft_loss
from sid.models.build import build_model, token_extension
from sid.models.flops import num_params, train_flops
from sid.models.qwen2 import Qwen2
from sid.parallel.mesh import data_parallel_size, tp_head_warning
from sid.run import RunDir
from sid.stage import hand_on, stage_main, start_run
from sid.trainer import fit, make_optimizer

log = logging.getLogger("sid")


def run_train(job: TrainJob) -> dict:
    """Train (and evaluate); returns run_summary.json's content."""
    run, tracker, mesh = start_run(job)
    rows_data, catalog, bad_rows = load_train_split(job.data, run.path)
    tok = load_tokenizer(job.tokenizer, catalog, dataset_dir(job.data, run.path), job.data.data_root)
    model = _model(job, tok, mesh, run)
    run.update(data={"train_rows": len(rows_data), "bad_rows": bad_rows.as_dict()})
    samples = build_sft_samples(rows_data, catalog, job.tasks, job.data.category_text)
    global_rows = job.train.per_device_batch_size * data_parallel_size(mesh) * job.train.grad_accum_steps
    plan = sft_plan(samples, tok, job.data, global_rows)
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


def _model(job: TrainJob, tok: SIDTokenizer, mesh, run: RunDir) -> Qwen2:
    """The configured model with the tokenizer's vocab (HF checkpoint or scratch), logged and recorded."""
    pretrained = load_qwen2(job.model.hf_path, job.model)[0] if job.model.hf_path else None
    model, vocab_resize = build_model(job.model, tok, pretrained)
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
