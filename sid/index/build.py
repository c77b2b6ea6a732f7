"""The SID-building job end to end: read the items and training interactions, embed, quantize, fix collisions,
write the dataset and a JSON report (`index_report.json`) beside it."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from sid.config import ConfigError
from sid.data.config import DataConfig
from sid.data.dataset import load_split, synthetic_dir
from sid.data.minionerec import Interaction
from sid.index.collisions import codebook_use, collision_stats, make_unique
from sid.index.config import EmbedConfig
from sid.index.embed import check_embeddings, collaborative, load_npy
from sid.index.write import copy_file, rewrite_csv, write_atomic, write_index, write_info
from sid.jobs import IndexJob
from sid.paths import resolve

logger = logging.getLogger(__name__)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def data_dir(cfg: DataConfig) -> Path:
    """The dataset directory the readers use for `cfg`."""
    return synthetic_dir(cfg, None) if cfg.source == "synthetic" else resolve(cfg.dir, cfg.data_root)


def embeddings(cfg: EmbedConfig, data: DataConfig, interactions: list[Interaction], item_ids: list[int]) -> np.ndarray:
    """[items, dim] float32 embeddings of `item_ids` (ascending) from the configured source, checked."""
    directory = data_dir(data)
    if cfg.source == "npy":
        return load_npy(cfg.npy_path, item_ids, cfg.expected_dim or None)
    if cfg.source == "text":
        from sid.index.text import text_embeddings

        emb = text_embeddings(cfg, directory / f"{data.category}.item.json", item_ids)
        return check_embeddings(emb, item_ids, cfg.model_dir, cfg.expected_dim or None)
    what = directory / (f"{data.category}.inter.json" if data.source == "letter" else split_files(data)[0])
    emb = collaborative(interactions, item_ids, cfg.dim, cfg.window, cfg.seed, what)
    return check_embeddings(emb, item_ids, what)


def split_files(data: DataConfig) -> tuple[str, str, str]:
    """The train, valid and test CSVs of a MiniOneRec-format source (synthetic data has fixed names)."""
    if data.source == "synthetic":
        return "train.csv", "valid.csv", "test.csv"
    return data.train_file, data.valid_file, data.test_file


def relative_error(x: np.ndarray, recon: np.ndarray) -> float:
    """||x - recon||^2 / ||x||^2 over all items."""
    return float(((x - recon) ** 2).sum() / max(float((x**2).sum()), 1e-30))


def write_dataset(job: IndexJob, out: Path, sids: dict[int, str]) -> None:
    """The files the readers need beside the index (see sid.index.write)."""
    src, category = data_dir(job.data), job.data.category
    if job.data.source == "letter":
        copy_file(src / f"{category}.inter.json", out)
        return
    item_json = src / f"{category}.item.json"
    if item_json.is_file():
        copy_file(item_json, out)
        write_info(out, item_json, sids)
    for name in TOKENIZER_FILES:  # a dataset's own tokenizer (the synthetic one) travels with it
        if (src / name).is_file():
            copy_file(src / name, out)
    for name in split_files(job.data):
        rows = rewrite_csv(src / name, out / name, sids)
        logger.info("rewrote %s (%d rows)", out / name, rows)


def run_index(job: IndexJob) -> dict:
    """Build the SIDs; returns the report (also written to `output.dir/index_report.json`)."""
    start = time.perf_counter()
    out = Path(job.output.dir)
    if out.resolve() == data_dir(job.data).resolve():
        raise ConfigError(f"output.dir {out} is the data directory: the built files would replace the data's")
    interactions, catalog, _ = load_split(job.data, "train")
    item_ids = sorted(catalog.sids)
    logger.info("%d items, %d training interactions", len(item_ids), len(interactions))
    x = embeddings(job.embed, job.data, interactions, item_ids)
    logger.info("embeddings %s from %s", x.shape, job.embed.source)
    q = job.quantizer.build()(x)
    codes = make_unique(q.codes, q.last_distances, job.quantizer.collisions)
    report = {
        "items": len(item_ids),
        "embedding_dim": int(x.shape[1]),
        "levels": int(codes.shape[1]),
        "collisions_before": collision_stats(q.codes),
        "collisions_after": collision_stats(codes),
        "codebook_use": codebook_use(codes, max(job.quantizer.codebook_size, int(codes.max()) + 1)),
        "relative_reconstruction_error": relative_error(x, q.reconstruct(q.codes)),
        "relative_reconstruction_error_after_fix": relative_error(x, q.reconstruct(codes)),
        "seconds": 0.0,
    }
    out.mkdir(parents=True, exist_ok=True)
    sids = write_index(out, job.data.category, item_ids, codes)
    if job.output.dataset_files:
        write_dataset(job, out, sids)
    report["seconds"] = round(time.perf_counter() - start, 2)
    write_atomic(out / "index_report.json", (json.dumps(report, indent=2) + "\n").encode("utf-8"))
    before, after = report["collisions_before"], report["collisions_after"]
    logger.info(
        "SIDs in %s: collision rate %.4f -> %.4f, codes used per level %s, relative reconstruction error %.4f",
        out,
        before["rate"],
        after["rate"],
        [u["used"] for u in report["codebook_use"]],
        report["relative_reconstruction_error_after_fix"],
    )
    return report
