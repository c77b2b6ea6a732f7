"""Configs for the tokenizer, the datasets and the SFT task mix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class TokenizerConfig:
    """The HF tokenizer files and the SID tokens added to them."""

    path: str = "qwen2_tokenizer"
    """Directory with tokenizer.json, or vocab.json + merges.txt + tokenizer_config.json. Relative paths are
    under the data root unless they start with ./ or ../."""
    add_sid_tokens: bool = True
    """Add every SID token of the index file as one atomic token, in numeric order per level."""
    eos_token: str = ""
    """Token appended after each completion; empty means the files' eos_token (tokenizer_config.json, then
    special_tokens_map.json). Qwen2.5 base files say <|endoftext|>; the Instruct files here say <|im_end|>."""


@dataclass(frozen=True)
class DataConfig:
    """Where the recommendation data is and how it becomes fixed-shape batches."""

    source: Literal["minionerec", "letter", "synthetic"] = "synthetic"
    """minionerec: CSV + info/index/item files; letter: inter.json + index.json (leave-one-out);
    synthetic: a seeded catalog written in MiniOneRec format (train.csv/valid.csv/test.csv; no download)."""
    data_root: str = ""
    """Root for relative data paths; empty means $SID_DATA_ROOT, else ../shared/data."""
    dir: str = "minionerec_industrial"
    """Dataset directory (relative to the data root). For synthetic data: where the files are written,
    relative to the run directory."""
    category: str = "Industrial_and_Scientific"
    """File stem of `{category}.index.json` / `{category}.item.json` (LETTER: `Instruments`)."""
    category_text: str = "industrial and scientific items"
    """Category words used by the title-history task."""
    train_file: str = "train_partial.csv"
    """Train CSV inside `dir` (MiniOneRec)."""
    valid_file: str = "valid.csv"
    """Validation CSV inside `dir` (MiniOneRec)."""
    test_file: str = "test.csv"
    """Test CSV inside `dir` (MiniOneRec)."""
    max_history: int = 20
    """LETTER: most recent history items kept per sample."""
    max_users: int = 0
    """LETTER: keep only the first N users of inter.json, in every split (0: all). A small deterministic subset
    for quick runs on a CPU."""
    max_len: int = 512
    """Tokens per row; over-long samples keep their last max_len tokens."""
    pack: bool = True
    """Pack several samples into one row with segment ids; otherwise pad each sample to its length bucket."""
    length_buckets: tuple[int, ...] = (128, 256, 512)
    """Row lengths used when not packing (each compiles once)."""
    shuffle_seed: int = 0
    """Seed of the per-epoch shuffle."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed row raises (naming file, line and field) or is skipped and counted in run_summary.json."""
    synthetic_items: int = 256
    """Synthetic catalog size."""
    synthetic_users: int = 600
    """Synthetic users (each gives several train rows and one valid and one test row)."""
    synthetic_seed: int = 0
    """Synthetic generator seed."""


@dataclass(frozen=True)
class TasksConfig:
    """The MiniOneRec SFT task mix; each task can be switched on or off."""

    next_sid: bool = True
    """1. SID history → next SID."""
    alignment: bool = True
    """2. SID↔title alignment: one sid2title sample per distinct SID and one title2sid per distinct title (the
    last item with it in the index), as upstream."""
    fusion: bool = True
    """3. SID history → next item's title."""
    title_history: bool = False
    """4. Title history → next SID."""
    eval_prompt: Literal["eval", "train"] = "eval"
    """Next-SID wording at eval: upstream's eval wording ('eval') or the training wording ('train')."""


@dataclass(frozen=True)
class CharDataConfig:
    """Character-level text (Tiny Shakespeare) for nanoGPT."""

    input_path: str = "tinyshakespeare/input.txt"
    """Text file; relative paths are under the data root unless they start with ./ or ../."""
    url: str = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
    """Downloaded to input_path when that file is missing (needs internet)."""
    train_fraction: float = 0.9
    """First fraction of the text for training, the rest for validation."""
    data_root: str = ""
    """Root for relative paths; empty means $SID_DATA_ROOT, else ../shared/data."""
