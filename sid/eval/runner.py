"""Rank a split: eval prompts → length buckets → sharded trie-constrained beam search → HR/NDCG, predictions.

Writes the calc.py-schema predictions file, a per-sample file mapping the top predictions back to items and
titles, prints the metrics table and returns the `eval` section of run_summary.json.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import numpy as np

from sid.data.config import DataConfig, TasksConfig
from sid.data.dataset import load_split
from sid.data.tasks import eval_prompts
from sid.data.tokenizer import SIDTokenizer
from sid.eval.beam import sharded_beam_search
from sid.eval.config import EvalConfig
from sid.eval.metrics import ranking_metrics
from sid.eval.predictions import explain, write_predictions
from sid.eval.trie import build_trie
from sid.models.qwen2 import Qwen2
from sid.parallel.host import global_array, to_host
from sid.parallel.mesh import batch_sharding, data_parallel_size
from sid.parallel.rules import param_shardings
from sid.run import RunDir
from sid.tracking import Tracker

log = logging.getLogger("sid")
EXPLAINED_TOP = 10


def bucketed_batches(prompts: list[list[int]], buckets: tuple[int, ...], batch: int, pad_id: int):
    """Yield (indices, input_ids[batch, L], mask[batch, L]): prompts left-padded to the smallest bucket that fits
    (over-long ones keep their last tokens), grouped by bucket; a short last batch repeats its first prompt (its
    results are dropped by the caller through `indices`)."""
    buckets = tuple(sorted(buckets))
    by_bucket: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        length = next((b for b in buckets if len(ids) <= b), buckets[-1])
        by_bucket.setdefault(length, []).append(i)
    for length, members in sorted(by_bucket.items()):
        for start in range(0, len(members), batch):
            idx = members[start : start + batch]
            rows = idx + [idx[0]] * (batch - len(idx))
            ids = np.full((batch, length), pad_id, np.int32)
            mask = np.zeros((batch, length), bool)
            for r, i in enumerate(rows):
                p = prompts[i][-length:]
                ids[r, length - len(p) :] = p
                mask[r, length - len(p) :] = True
            yield idx, ids, mask


def evaluate(
    model: Qwen2,
    tok: SIDTokenizer,
    data_cfg: DataConfig,
    tasks_cfg: TasksConfig,
    eval_cfg: EvalConfig,
    *,
    mesh,
    run: RunDir,
    tracker: Tracker,
    split_data: tuple | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Beam-search every prompt of `eval_cfg.split` and score the predictions against the targets.

    `split_data` is `load_split`'s result when the caller already read the split."""
    interactions, catalog, bad_rows = split_data or load_split(data_cfg, eval_cfg.split, run_dir=run.path)
    pairs = eval_prompts(interactions, tasks_cfg)
    if eval_cfg.max_samples:
        pairs = pairs[: eval_cfg.max_samples]
    newline = tok.encode("\n")
    if len(newline) != 1:
        raise ValueError(f'the tokenizer splits "\\n" into {newline}; the SID completion needs it as one token')
    trie = build_trie(catalog.sids, {t: tok.token_id(t) for t in catalog.sid_tokens()}, (newline[0], tok.eos_id))
    if eval_cfg.num_beams < max(eval_cfg.topk):
        raise ValueError(f"eval.num_beams={eval_cfg.num_beams} is smaller than the largest K in {eval_cfg.topk}")
    prompts = tok.encode_batch([p for p, _ in pairs])
    targets = [t for _, t in pairs]
    truncated = sum(len(p) > max(eval_cfg.prompt_buckets) for p in prompts)
    if truncated:
        log.warning(
            "%d prompts are longer than the largest bucket %d and keep their last tokens",
            truncated,
            max(eval_cfg.prompt_buckets),
        )

    model = jax.device_put(model, param_shardings(model, mesh))
    search = sharded_beam_search(mesh, model, num_beams=eval_cfg.num_beams)
    tables = trie.tables
    batch = eval_cfg.per_device_batch_size * data_parallel_size(mesh)
    sharding = batch_sharding(mesh)
    predictions: list[list[str] | None] = [None] * len(prompts)
    compiled, compile_s, search_s = {}, 0.0, 0.0
    bar = None
    if progress and run.main:
        from tqdm import tqdm

        bar = tqdm(total=len(prompts), desc=f"eval {eval_cfg.split}", dynamic_ncols=True)
    t0 = time.perf_counter()
    for idx, ids, mask in bucketed_batches(prompts, eval_cfg.prompt_buckets, batch, tok.pad_id):
        ids, mask = global_array(ids, sharding), global_array(mask, sharding)
        if ids.shape not in compiled:
            tc = time.perf_counter()
            compiled[ids.shape] = search.lower(model, tables, ids, mask).compile()
            compile_s += time.perf_counter() - tc
        ts = time.perf_counter()
        out = compiled[ids.shape](model, tables, ids, mask)
        leaves = np.asarray(to_host(out.leaves))
        search_s += time.perf_counter() - ts
        for i, pred in zip(idx, trie.predictions(leaves[: len(idx)]), strict=True):
            predictions[i] = pred
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t0

    metrics = ranking_metrics(predictions, targets, eval_cfg.topk, set(catalog.sids.values()))
    if run.main:
        write_predictions(run.path / eval_cfg.predictions_file, targets, predictions)
        items_by_sid = catalog.items_by_sid
        with open(run.path / "predictions_items.jsonl", "w") as f:
            for target, pred in zip(targets, predictions, strict=True):
                ranked = explain(pred[:EXPLAINED_TOP], items_by_sid, catalog.titles)
                f.write(json.dumps({"target": target, "top": ranked}) + "\n")
    log.info(
        "eval on %s (%d samples, %d beams):\n%s", eval_cfg.split, metrics.n_samples, eval_cfg.num_beams, metrics.table()
    )
    result = {
        **metrics.to_dict(),
        "n_beams": eval_cfg.num_beams,
        "split": eval_cfg.split,
        "samples_per_s": len(prompts) / search_s if search_s else None,
        "compile_s": compile_s,
        "wall_s": wall,
        "bad_rows": bad_rows.as_dict(),
    }
    tracker.log({**metrics.flat(), "eval/samples_per_s": result["samples_per_s"] or 0.0}, step=0)
    return result
