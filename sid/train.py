"""`python -m sid.train`: SID supervised fine-tuning of a Qwen2 model, then (eval.enabled) ranking evaluation.

Data → tokenizer with SID tokens → model (HF checkpoint or scratch, vocab resized and padded) → packed batches →
the shared trainer → HF export of the final model (RUN_DIR/model) → trie-constrained beam-search eval.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from pathlib import Path

import equinox as eqx
import jax

from sid.compat.hf import export_qwen2, load_qwen2
from sid.config import run_cli
from sid.data.dataset import dataset_dir, load_split, load_tokenizer
from sid.data.pipeline import BatchPlan
from sid.data.tasks import build_sft_samples, encode_all
from sid.data.tokenizer import SIDTokenizer
from sid.jobs import TrainJob
from sid.loss import cross_entropy_sum
from sid.models.build import build_model, token_extension
from sid.models.flops import num_params, train_flops
from sid.models.layers import DTYPES
from sid.models.qwen2 import Qwen2
from sid.parallel.distributed import init_distributed
from sid.parallel.host import to_host
from sid.parallel.mesh import data_parallel_size, make_mesh, tp_head_warning
from sid.parallel.trace import traced_on
from sid.run import RunDir, load_dotenv
from sid.tracking import Tracker
from sid.trainer import check_output_dir, fit, make_optimizer, to_global

log = logging.getLogger("sid")


def sft_loss(model: Qwen2, batch, key):
    """Sum of next-token losses over supervised (completion) tokens of a packed batch."""
    hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"])
    return cross_entropy_sum(
        hidden,
        model.head_weight(),
        batch["targets"],
        valid_vocab=model.valid_vocab,
        compute_dtype=DTYPES[model.config.compute_dtype],
    )


def make_eval_loss(job: TrainJob, tok: SIDTokenizer, mesh, run_dir: Path):
    """Held-out loss on the valid split (its per-interaction tasks; alignment is per item, so it is excluded):
    the token-weighted mean over the first `eval_loss_batches` batches of one fixed shuffled epoch."""
    interactions, catalog, _ = load_split(job.data, "valid", run_dir=run_dir)
    samples = build_sft_samples(
        interactions, catalog, dataclasses.replace(job.tasks, alignment=False), job.data.category_text
    )
    plan = BatchPlan(
        encode_all(samples, tok, job.data.max_len),
        rows_per_step=job.train.per_device_batch_size * data_parallel_size(mesh),
        max_len=job.data.max_len,
        pack=job.data.pack,
        buckets=job.data.length_buckets,
    )
    batches = plan.eval_batches(process_index=jax.process_index(), process_count=jax.process_count())
    # Placed on the device once: every evaluation reuses them.
    batches = [to_global(b, mesh) for b in batches[: job.train.eval_loss_batches]]
    batch_loss = eqx.filter_jit(traced_on(mesh, lambda model, batch: sft_loss(model, batch, None)))

    def estimate(model, step: int) -> float:
        results = jax.device_get([batch_loss(model, b) for b in batches])  # one sync, not one per batch
        total, tokens = 0.0, 0
        for loss_sum, n in results:
            total, tokens = total + float(loss_sum), tokens + int(n)
        return total / max(tokens, 1)

    return estimate


def run_train(job: TrainJob) -> dict:
    """Train (and evaluate); returns run_summary.json's content."""
    init_distributed(job.mesh)
    load_dotenv()
    check_output_dir(job.train)
    run = RunDir(job.train.output_dir, job)
    mesh = make_mesh(job.mesh)
    log.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.devices.size, jax.devices()[0].platform)

    rows_data, catalog, bad_rows = load_split(job.data, "train", run_dir=run.path)
    tok = load_tokenizer(job.tokenizer, catalog, dataset_dir(job.data, run.path), job.data.data_root)
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
    run.update(
        token_extension=token_extension(tok),
        vocab_resize=vocab_resize,
        data={"train_rows": len(rows_data), "bad_rows": bad_rows.as_dict()},
    )

    samples = build_sft_samples(rows_data, catalog, job.tasks, job.data.category_text)
    global_rows = job.train.per_device_batch_size * data_parallel_size(mesh) * job.train.grad_accum_steps
    plan = BatchPlan(
        encode_all(samples, tok, job.data.max_len),
        rows_per_step=global_rows,
        max_len=job.data.max_len,
        pack=job.data.pack,
        buckets=job.data.length_buckets,
    )
    steps = job.train.max_steps or math.ceil(job.train.epochs * plan.steps_per_epoch)
    log.info(
        "data: %d samples, %d steps/epoch of %d rows, %d steps", len(samples), plan.steps_per_epoch, global_rows, steps
    )
    run.update(data={**run.summary["data"], "samples": len(samples), **plan.summary()})
    batches = plan.train_iterator(
        seed=job.train.seed, process_index=jax.process_index(), process_count=jax.process_count()
    )

    optimizer, lr = make_optimizer(job.optimizer, job.train, steps, model)

    tracker = Tracker(job.wandb, run_name=run.path.name, config=run.summary["config"], enabled=run.main)
    model, train = fit(
        model=model,
        loss_fn=sft_loss,
        optimizer=optimizer,
        lr_schedule=lr,
        batches=batches,
        total_steps=steps,
        cfg=job.train,
        mesh=mesh,
        run=run,
        tracker=tracker,
        flops=train_flops(model, job.data.max_len),
        eval_loss=make_eval_loss(job, tok, mesh, run.path) if job.train.eval_loss_every else None,
    )
    train.update(effective_batch_size=global_rows, steps_per_epoch=plan.steps_per_epoch)
    run.update(train=train)
    if train.get("preempted_at") is not None:
        tracker.finish()
        return run.summary
    host_model = to_host(model)  # a collective on multi-host runs: every process takes part
    if run.main:
        export_qwen2(host_model, run.path / "model", tok.tokenizer, eos_token=tok.tokenizer.id_to_token(tok.eos_id))
    if job.eval.enabled:
        from sid.eval.runner import evaluate

        metrics = evaluate(model, tok, job.data, job.tasks, job.eval, mesh=mesh, run=run, tracker=tracker)
        run.update(eval=metrics)
    tracker.finish()
    return run.summary


def main(argv: list[str] | None = None) -> int:
    return run_cli(TrainJob, run_train, argv)


if __name__ == "__main__":
    sys.exit(main())
