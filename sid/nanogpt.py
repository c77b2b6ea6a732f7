"""`python -m sid.nanogpt`: Karpathy's nanoGPT on character-level Tiny Shakespeare, on the shared trainer.

The regression workload: same trainer, optimizers, checkpoints and logging as SFT. Keeps the best model by
held-out loss, samples text from it, and writes run_summary.json.
"""

from __future__ import annotations

import dataclasses
import logging
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from sid.config import SampleConfig, run_cli
from sid.data.chars import CharBatchIterator, CharData
from sid.jobs import NanoGPTJob
from sid.loss import cross_entropy_sum
from sid.models.flops import train_flops
from sid.models.layers import DTYPES
from sid.models.nanogpt import GPT
from sid.parallel.host import to_global
from sid.parallel.mesh import data_parallel_size, tp_head_warning
from sid.parallel.trace import traced_on
from sid.run import RunDir
from sid.stage import start_run
from sid.trainer import fit, make_optimizer

log = logging.getLogger("sid")


def gpt_loss(model: GPT, batch, key):
    """Sum of next-character losses (dropout active: a key is always given in training)."""
    dropout_key = key if model.config.dropout > 0 else None
    hidden = model(batch["input_ids"], key=dropout_key)
    return cross_entropy_sum(
        hidden,
        model.head_weight(),
        batch["targets"],
        valid_vocab=model.config.vocab_size,
        compute_dtype=DTYPES[model.config.compute_dtype],
    )


def make_eval_loss(data: CharData, job: NanoGPTJob, rows: int, mesh):
    """Mean held-out loss over `eval_loss_batches` fixed batches (same batches every call: deterministic). Each
    process draws its own rows of every batch (`get_batch`), placed as one global array over the mesh."""

    def mean_loss(model, batch):
        total, n = gpt_loss(model, batch, None)
        return total / n

    batch_loss = eqx.filter_jit(traced_on(mesh, mean_loss))

    def placed(i: int) -> dict:
        x, y = data.get_batch("val", rows, job.model.block_size, seed=job.train.seed + 1, step=i)
        return to_global({"input_ids": x, "targets": y}, mesh)

    # Drawn and placed on the device once: every evaluation reuses them.
    batches = [placed(i) for i in range(job.train.eval_loss_batches)]

    def estimate(model) -> float:
        losses = jax.device_get([batch_loss(model, b) for b in batches])  # one sync, not one per batch
        return float(np.mean([float(loss) for loss in losses]))

    return estimate


class _KeepBest:
    """The held-out loss as an evaluator of the trainer, keeping the model of the lowest one in best_model.eqx."""

    def __init__(self, estimate, every: int, run: RunDir):
        self.estimate, self.every, self.run = estimate, every, run
        self.path = run.path / "best_model.eqx"
        self.loss, self.step = float("inf"), None

    def __call__(self, model, step: int) -> dict[str, float]:
        loss = self.estimate(model)
        if loss < self.loss:
            self.loss, self.step = loss, step
            if self.run.main:
                eqx.tree_serialise_leaves(self.path, model)
        return {"eval_loss": loss}


def sample(model: GPT, data: CharData, cfg: SampleConfig, *, seed: int) -> list[str]:
    """Autoregressive sampling with temperature and top-k over a sliding block_size window."""
    block = model.config.block_size

    @eqx.filter_jit
    def next_logits(model, window, last):
        hidden = model(window[None])
        return model.logits(hidden[0, last])

    key = jax.random.key(seed)
    out = []
    for _ in range(cfg.num_samples):
        ids = list(data.codec.encode(cfg.prompt))
        for _ in range(cfg.max_new_tokens):
            ctx = ids[-block:]
            window = np.zeros(block, np.int32)
            window[: len(ctx)] = ctx  # causal: positions after the context do not affect its logits
            logits = next_logits(model, jnp.asarray(window), jnp.asarray(len(ctx) - 1)) / cfg.temperature
            if cfg.top_k:
                kth = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))[0][-1]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            key, sub = jax.random.split(key)
            ids.append(int(jax.random.categorical(sub, logits)))
        out.append(data.codec.decode(np.asarray(ids)))
    return out


def run_nanogpt(job: NanoGPTJob) -> dict:
    """Train, keep the best model by held-out loss, sample from it; returns run_summary.json's content."""
    run, tracker, mesh = start_run(job)
    data = CharData.load(job.data)
    gcfg = dataclasses.replace(job.model, vocab_size=job.model.vocab_size or data.codec.vocab_size)
    model = GPT.init(gcfg, key=jax.random.key(gcfg.seed))
    log.info("nanoGPT: %.2fM parameters (excluding position embeddings)", model.num_params() / 1e6)
    if warning := tp_head_warning(mesh.shape["tp"], heads=gcfg.n_head):
        log.warning(warning)
    rows = job.train.per_device_batch_size * data_parallel_size(mesh) * job.train.grad_accum_steps
    steps = job.train.max_steps or int(job.train.epochs * len(data.splits["train"]) / (rows * gcfg.block_size))
    batches = CharBatchIterator(
        data,
        "train",
        rows,
        gcfg.block_size,
        job.train.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    optimizer, lr = make_optimizer(job.optimizer, job.train, steps, model)
    best = _KeepBest(make_eval_loss(data, job, rows, mesh), job.train.eval_loss_every, run)
    model, train = fit(
        model=model,
        loss_fn=gpt_loss,
        optimizer=optimizer,
        lr_schedule=lr,
        batches=batches,
        total_steps=steps,
        cfg=job.train,
        mesh=mesh,
        run=run,
        tracker=tracker,
        flops=train_flops(model, model.config.block_size),
        evaluators=[best],
    )
    best_path = best.path
    best_model = eqx.tree_deserialise_leaves(best_path, model) if best_path.is_file() else model
    texts = sample(best_model, data, job.sample, seed=job.train.seed)
    if run.main:
        (run.path / "samples.txt").write_text("\n\n---\n\n".join(texts))
    log.info("sample from the best model (step %s):\n%s", best.step, texts[0] if texts else "")
    summary_train = {
        **train,
        "final_train_loss": train["final_loss"],
        "best_eval_loss": best.loss if best.step is not None else None,
        "best_eval_step": best.step,
        "ms_per_iter": 1000 * train["step_time_s"] if train["step_time_s"] else None,
        "effective_batch_size": rows,
    }
    run.update(train=summary_train)
    tracker.summary({"best_eval_loss": summary_train["best_eval_loss"]})
    tracker.finish()
    return run.summary


def main(argv: list[str] | None = None) -> int:
    return run_cli(NanoGPTJob, run_nanogpt, argv)


if __name__ == "__main__":
    sys.exit(main())
