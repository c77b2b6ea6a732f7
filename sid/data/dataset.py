"""A data config turned into what a stage reads: a split's rows and catalog, the directory of its files, and the
tokenizer with the catalog's SID tokens. Train, eval and the stages after them (RL) all start here.

Sources: minionerec reads `cfg.{split}_file` in `cfg.dir`; letter does leave-one-out over `{category}.inter.json`;
synthetic (re)writes its files first (same config -> same bytes), then reads them as MiniOneRec.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Literal

from sid.data.config import DataConfig, TokenizerConfig
from sid.data.errors import BadRowReport
from sid.data.letter import read_letter
from sid.data.minionerec import Catalog, Interaction, load_catalog, read_csv
from sid.data.synthetic import write_synthetic
from sid.data.tokenizer import SIDTokenizer, build_tokenizer
from sid.errors import ConfigError
from sid.paths import resolve

Split = Literal["train", "valid", "test"]


def synthetic_dir(cfg: DataConfig, run_dir: str | Path | None) -> Path:
    """Where synthetic files go: `run_dir/cfg.dir`, else a cache directory named by the generator's arguments."""
    if run_dir is not None:
        return Path(run_dir) / cfg.dir
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return (
        cache / "sid" / f"synthetic-{cfg.category}-i{cfg.synthetic_items}-u{cfg.synthetic_users}-s{cfg.synthetic_seed}"
    )


def dataset_dir(cfg: DataConfig, run_dir: str | Path | None) -> Path:
    """Where the split files are (synthetic data is written under the run directory)."""
    if cfg.source == "synthetic":
        return synthetic_dir(cfg, run_dir)
    return resolve(cfg.dir, cfg.data_root)


def load_split(
    cfg: DataConfig, split: Split, run_dir: str | Path | None = None
) -> tuple[list[Interaction], Catalog, BadRowReport]:
    """Read one split of the configured source: its interactions, the catalog, and the bad rows skipped."""
    bad_rows = BadRowReport(on_bad_row=cfg.on_bad_row)
    if cfg.source == "letter":
        directory = resolve(cfg.dir, cfg.data_root)
        rows, catalog = read_letter(
            directory, cfg.category, split, max_history=cfg.max_history, max_users=cfg.max_users, bad_rows=bad_rows
        )
        return rows, catalog, bad_rows
    if cfg.source == "synthetic":
        directory = write_synthetic(
            synthetic_dir(cfg, run_dir),
            num_items=cfg.synthetic_items,
            num_users=cfg.synthetic_users,
            seed=cfg.synthetic_seed,
            category=cfg.category,
        )
        file = f"{split}.csv"
    else:
        directory = resolve(cfg.dir, cfg.data_root)
        file = {"train": cfg.train_file, "valid": cfg.valid_file, "test": cfg.test_file}[split]
    catalog = load_catalog(directory, cfg.category)
    path = directory / file
    if not path.is_file():
        raise FileNotFoundError(f"{split} file {path} not found (data.dir / data.{split}_file)")
    return read_csv(path, catalog, bad_rows), catalog, bad_rows


def load_train_split(cfg: DataConfig, run_dir: str | Path | None = None):
    """The train split's rows, catalog and skipped rows; no usable row is an error (else the alignment samples alone
    would train, or the batch plan fail without saying why)."""
    rows_data, catalog, bad_rows = load_split(cfg, "train", run_dir=run_dir)
    if not rows_data:
        first = f"; the first: {bad_rows.examples[0]}" if bad_rows.examples else ""
        raise ConfigError(
            f"the train split of {cfg.source} data in {cfg.dir} has no usable rows "
            f"({bad_rows.total} bad rows skipped: {bad_rows.counts}{first})"
        )
    return rows_data, catalog, bad_rows


def tokenizer_dir(cfg: TokenizerConfig, data_dir: Path, data_root: str) -> Path:
    """The tokenizer files: `tokenizer.path`, or the dataset's own directory when it is empty."""
    return data_dir if not cfg.path else resolve(cfg.path, data_root)


def load_tokenizer(cfg: TokenizerConfig, catalog: Catalog, data_dir: Path, data_root: str) -> SIDTokenizer:
    """The tokenizer of `cfg` (see `tokenizer_dir`) with a token for every SID code of `catalog`."""
    path = tokenizer_dir(cfg, data_dir, data_root)
    return build_tokenizer(dataclasses.replace(cfg, path=str(path.absolute())), catalog.sid_tokens())
