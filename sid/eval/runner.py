"""Rank a split: eval prompts → length buckets → sharded trie-constrained beam search → HR/NDCG, predictions.

Writes the calc.py-schema predictions file, a per-sample file mapping the top predictions back to items and
titles, prints the metrics table and returns the `eval` section of run_summary.json.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from sid.data.config import DataConfig, TasksConfig
from sid.data.dataset import load_split
from sid.data.tasks import eval_prompts
from sid.data.tokenizer import SIDTokenizer
from sid.eval.beam import sharded_beam_search
from sid.eval.config import EvalConfig
from sid.eval.metrics import ranking_metrics
from sid.eval.predictions import write_explained, write_predictions
from sid.eval.trie import SidTrie, build_trie
from sid.models.qwen2 import Qwen2
from sid.parallel.host import global_array, to_host
from sid.parallel.mesh import batch_sharding, data_parallel_size
from sid.parallel.rules import param_shardings
from sid.run import RunDir
from sid.tracking import Tracker

log = logging.getLogger("sid")
EXPLAINED_TOP = 10


def smallest_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest of `buckets` that holds `length` tokens; the largest when none does (a longer prompt keeps its
    last tokens)."""
    return min((b for b in buckets if b >= length), default=max(buckets))


def bucketed_batches(prompts: list[list[int]], buckets: tuple[int, ...], batch: int, pad_id: int):
    """Yield (indices, input_ids[batch, L], mask[batch, L]): prompts left-padded to the smallest bucket that fits
    (over-long ones keep their last tokens), grouped by bucket; a short last batch repeats its first prompt (its
    results are dropped by the caller through `indices`)."""
    by_bucket: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        length = smallest_bucket(len(ids), buckets)
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


def catalog_trie(tok: SIDTokenizer, catalog) -> SidTrie:
    """The trie of the catalog's SIDs in the tokenizer's ids, each completion ending "\\n" then EOS."""
    newline = tok.encode("\n")
    if len(newline) != 1:
        raise ValueError(f'the tokenizer splits "\\n" into {newline}; the SID completion needs it as one token')
    sid_ids = {t: tok.token_id(t) for t in catalog.sid_tokens()}
    return build_trie(catalog.sids, sid_ids, (newline[0], tok.eos_id))


class Ranker:
    """Ranks a fixed list of prompts by trie-constrained beam search over the catalog's SIDs. The search is compiled
    once per prompt bucket and reused across calls, so ranking the valid split during training compiles once."""

    def __init__(self, tok: SIDTokenizer, catalog, prompts: list[str], eval_cfg: EvalConfig, mesh, *, desc: str):
        if eval_cfg.num_beams < max(eval_cfg.topk):
            raise ValueError(f"eval.num_beams={eval_cfg.num_beams} is smaller than the largest K in {eval_cfg.topk}")
        self.trie = catalog_trie(tok, catalog)
        self.prompts = tok.encode_batch(prompts)
        self.cfg, self.mesh, self.pad_id, self.desc = eval_cfg, mesh, tok.pad_id, desc
        self.compiled: dict[tuple, Any] = {}
        self.compile_s = self.search_s = 0.0
        truncated = sum(len(p) > max(eval_cfg.prompt_buckets) for p in self.prompts)
        if truncated:
            log.warning(
                "%d prompts are longer than the largest bucket %d and keep their last tokens",
                truncated,
                max(eval_cfg.prompt_buckets),
            )

    def __call__(self, model: Qwen2, *, progress: bool = False) -> list[list[str]]:
        """Each prompt's ranked SID strings (num_beams of them)."""
        model = jax.device_put(model, param_shardings(model, self.mesh))
        search = sharded_beam_search(self.mesh, model, num_beams=self.cfg.num_beams)
        batch = self.cfg.per_device_batch_size * data_parallel_size(self.mesh)
        sharding = batch_sharding(self.mesh)
        predictions: list[list[str] | None] = [None] * len(self.prompts)
        bar = tqdm(total=len(self.prompts), desc=self.desc, dynamic_ncols=True) if progress else None
        for idx, ids, mask in bucketed_batches(self.prompts, self.cfg.prompt_buckets, batch, self.pad_id):
            ids, mask = global_array(ids, sharding), global_array(mask, sharding)
            if ids.shape not in self.compiled:
                tc = time.perf_counter()
                self.compiled[ids.shape] = search.lower(model, self.trie.tables, ids, mask).compile()
                self.compile_s += time.perf_counter() - tc
            ts = time.perf_counter()
            leaves = np.asarray(to_host(self.compiled[ids.shape](model, self.trie.tables, ids, mask).leaves))
            self.search_s += time.perf_counter() - ts
            for i, pred in zip(idx, self.trie.predictions(leaves[: len(idx)]), strict=True):
                predictions[i] = pred
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        return predictions


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
) -> dict[str, Any]:
    """Beam-search every prompt of `eval_cfg.split`, score the predictions against the targets, write the
    predictions files; returns run_summary.json's `eval` section.

    `split_data` is `load_split`'s result when the caller already read the split."""
    interactions, catalog, bad_rows = split_data or load_split(data_cfg, eval_cfg.split, run_dir=run.path)
    pairs = eval_prompts(interactions, tasks_cfg)
    if eval_cfg.max_samples:
        pairs = pairs[: eval_cfg.max_samples]
    targets = [t for _, t in pairs]
    ranker = Ranker(tok, catalog, [p for p, _ in pairs], eval_cfg, mesh, desc=f"eval {eval_cfg.split}")
    t0 = time.perf_counter()
    predictions = ranker(model, progress=run.main)
    wall = time.perf_counter() - t0
    metrics = ranking_metrics(predictions, targets, eval_cfg.topk, set(catalog.sids.values()))
    if run.main:
        write_predictions(run.path / eval_cfg.predictions_file, targets, predictions)
        explained = run.path / "predictions_items.jsonl"
        write_explained(explained, targets, predictions, catalog.items_by_sid, catalog.titles, EXPLAINED_TOP)
    log.info(
        "eval on %s (%d samples, %d beams):\n%s", eval_cfg.split, metrics.n_samples, eval_cfg.num_beams, metrics.table()
    )
    samples_per_s = len(predictions) / ranker.search_s if ranker.search_s else None
    result = {
        **metrics.to_dict(),
        "n_beams": eval_cfg.num_beams,
        "split": eval_cfg.split,
        "samples_per_s": samples_per_s,
        "compile_s": ranker.compile_s,
        "wall_s": wall,
        "bad_rows": bad_rows.as_dict(),
    }
    tracker.log({**metrics.flat(), "eval/samples_per_s": samples_per_s or 0.0}, step=0)
    return result
