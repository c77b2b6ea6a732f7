"""The SFT stage's evaluators during training (sid.selection.Evaluator): the held-out loss on the valid split's
samples, and the ranking of a fixed valid subset by the same trie-constrained beam search as the test eval."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

from sid.data.dataset import load_split
from sid.data.pipeline import BatchPlan
from sid.data.tasks import build_sft_samples, eval_prompts, sft_plan
from sid.data.tokenizer import SIDTokenizer
from sid.eval.config import EvalConfig
from sid.eval.metrics import ranking_metrics
from sid.eval.runner import Ranker
from sid.parallel.host import to_global
from sid.parallel.mesh import data_parallel_size
from sid.parallel.trace import traced_on

log = logging.getLogger("sid")


class HeldOutLoss:
    """Token-weighted mean loss over fixed held-out batches (placed on the devices once), overall (`eval_loss`,
    metrics.jsonl's key since the first runs) and per task (`eval_loss/<task>`) when the loss reports task stats."""

    def __init__(self, plan: BatchPlan, loss_fn: Callable, *, batches: int, every: int, mesh):
        host = plan.eval_batches(process_index=jax.process_index(), process_count=jax.process_count())
        self.batches = [to_global(b, mesh) for b in host[:batches]]
        self.batch_loss = eqx.filter_jit(traced_on(mesh, lambda model, batch: loss_fn(model, batch, None)))
        self.every = every

    def __call__(self, model, step: int) -> dict[str, float]:
        results = jax.device_get([self.batch_loss(model, b) for b in self.batches])  # one sync, not one per batch
        total = sum(float(r[0]) for r in results)
        tokens = sum(int(r[1]) for r in results)
        out = {"eval_loss": total / max(tokens, 1)}
        stats: dict[str, Any] = {}
        for r in results:
            for key, value in (r[2] if len(r) > 2 else {}).items():
                stats[key] = stats.get(key, 0) + np.asarray(value)
        for key, value in stats.items():
            if key.startswith("loss_sum/") and stats[key.replace("loss_sum/", "tokens/")] > 0:
                out[key.replace("loss_sum/", "eval_loss/")] = float(value / stats[key.replace("loss_sum/", "tokens/")])
        return out


class ValidRanking:
    """HR@K and NDCG@K (`valid/hr@K`, `valid/ndcg@K`) of a fixed, seeded subset of the valid split's prompts."""

    def __init__(self, tok, catalog, pairs: list[tuple[str, str]], eval_cfg: EvalConfig, mesh, *, samples: int,
                 every: int, seed: int):  # fmt: skip
        if samples and samples < len(pairs):
            keep = np.sort(np.random.default_rng(seed).choice(len(pairs), samples, replace=False))
            pairs = [pairs[i] for i in keep]
        self.targets = [t for _, t in pairs]
        self.catalog_sids = set(catalog.sids.values())
        self.topk = eval_cfg.topk
        self.ranker = Ranker(tok, catalog, [p for p, _ in pairs], eval_cfg, mesh, desc="valid ranking")
        self.every = every
        log.info("valid ranking: %d prompts, %d beams, every %d steps", len(pairs), eval_cfg.num_beams, every)

    def __call__(self, model, step: int) -> dict[str, float]:
        m = ranking_metrics(self.ranker(model), self.targets, self.topk, self.catalog_sids)
        return {**{f"valid/hr@{k}": v for k, v in m.hr.items()}, **{f"valid/ndcg@{k}": v for k, v in m.ndcg.items()}}


def sft_evaluators(job, tok: SIDTokenizer, mesh, run_dir: Path, loss_fn) -> list:
    """The held-out loss on every enabled task of the valid split, and the ranking of a fixed valid subset (the SFT
    and the RL stage's evaluators; `job` is a TrainJob or an RLJob: its data, tasks, train and eval sections)."""
    cfg, evaluators = job.train, []
    if not (cfg.eval_loss_every or cfg.valid_rank_every):
        return evaluators
    interactions, catalog, _ = load_split(job.data, "valid", run_dir=run_dir)
    if cfg.eval_loss_every:
        samples = build_sft_samples(interactions, catalog, job.tasks, job.data.category_text)
        plan = sft_plan(samples, tok, job.data, cfg.per_device_batch_size * data_parallel_size(mesh))
        every, batches = cfg.eval_loss_every, cfg.eval_loss_batches
        evaluators.append(HeldOutLoss(plan, loss_fn, batches=batches, every=every, mesh=mesh))
    if cfg.valid_rank_every:
        pairs = eval_prompts(interactions, job.tasks)
        every, samples = cfg.valid_rank_every, cfg.valid_rank_samples
        ranking = ValidRanking(tok, catalog, pairs, job.eval, mesh, samples=samples, every=every, seed=cfg.seed)
        evaluators.append(ranking)
    return evaluators
