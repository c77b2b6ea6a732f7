"""Character-level text data for nanoGPT (Tiny Shakespeare): the codec, the train/val split, block sampling.

As in Karpathy's nanoGPT `data/shakespeare_char`: the vocabulary is the sorted set of characters of the whole
text, the first `train_fraction` of it trains and the rest validates, and a batch is `batch_size` random windows
of `block_size + 1` characters (x = the first block_size, y = x shifted by one). Unlike nanoGPT, a batch is a
pure function of (split, seed, step), so eval-loss estimates are deterministic for a seed and a resumed run
draws exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grain
import jax
import numpy as np

from sid.data.config import CharDataConfig
from sid.paths import resolve

Split = Literal["train", "val"]


class CharCodec:
    """Characters ↔ ids 0..V-1, ids in code-point order of the characters."""

    def __init__(self, chars: str):
        if not chars or list(chars) != sorted(set(chars)):
            raise ValueError("the vocabulary must be non-empty, sorted and without repeats")
        self.chars = chars
        self._code_points = np.array([ord(c) for c in chars], dtype=np.uint32)

    @classmethod
    def from_text(cls, text: str) -> CharCodec:
        """The codec of every distinct character of `text`."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """Ids (int32) of the characters of `text`; raises on a character outside the vocabulary."""
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        ids = np.minimum(np.searchsorted(self._code_points, points), self.vocab_size - 1)
        unknown = self._code_points[ids] != points
        if unknown.any():
            raise ValueError(f"characters not in the vocabulary: {sorted({chr(c) for c in points[unknown]})[:10]}")
        return ids.astype(np.int32)

    def decode(self, ids: Any) -> str:
        """The text of a sequence of ids."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got {ids.min()}..{ids.max()}")
        return self._code_points[ids].astype("<u4").tobytes().decode("utf-32-le")


def text_path(cfg: CharDataConfig) -> Path:
    """The local text file, downloaded from `cfg.url` first if it is missing."""
    path = resolve(cfg.input_path, cfg.data_root)
    if path.is_file():
        return path
    if not cfg.url:
        raise FileNotFoundError(f"{path} does not exist and no download url is configured")
    try:
        with urllib.request.urlopen(cfg.url, timeout=60) as response:
            data = response.read()
    except OSError as e:  # URLError and timeouts are OSErrors
        raise FileNotFoundError(
            f"{path} does not exist and downloading {cfg.url} failed ({e}). Without internet, put the text file "
            "there, or point data.input_path / data.data_root / $SID_DATA_ROOT at a copy."
        ) from e
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)  # a crash mid-write never leaves a truncated file behind
    return path


class CharData:
    """A text as ids, split into `train` and `val`, with Karpathy-style random block sampling."""

    def __init__(self, text: str, train_fraction: float = 0.9):
        if not 0.0 < train_fraction < 1.0:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        self.codec = CharCodec.from_text(text)
        data = self.codec.encode(text)
        n = int(len(data) * train_fraction)
        self.splits: dict[str, np.ndarray] = {"train": data[:n], "val": data[n:]}

    @classmethod
    def load(cls, cfg: CharDataConfig) -> CharData:
        """Reads (or downloads) `cfg.input_path` as UTF-8, bytes as they are (no newline translation)."""
        return cls(text_path(cfg).read_bytes().decode("utf-8"), cfg.train_fraction)

    def get_batch(
        self,
        split: Split,
        batch_size: int,
        block_size: int,
        *,
        seed: int,
        step: int,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """This host's rows of global batch `step`: x, y int32 [batch_size / hosts, block_size], y = x shifted by 1.

        The window starts are uniform over [0, len(split) - block_size), drawn from (seed, step) only.
        """
        if split not in self.splits:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        data = self.splits[split]
        if not 0 < block_size < len(data):
            raise ValueError(f"block_size {block_size} must be in (0, {len(data)}) for the {split} split")
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        if batch_size % count or not 0 <= index < count:
            raise ValueError(f"batch size {batch_size} cannot be split evenly over {count} hosts ({index=})")
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(data) - block_size, size=batch_size)
        per_host = batch_size // count
        windows = starts[index * per_host : (index + 1) * per_host, None] + np.arange(block_size + 1)
        tokens = data[windows]
        return np.ascontiguousarray(tokens[:, :-1]), np.ascontiguousarray(tokens[:, 1:])


@dataclass(eq=False)
class CharBatchIterator(grain.DatasetIterator):
    """Endless batches `get_batch(step=0, 1, ...)` as train-batch dicts: input_ids = x, targets = y, positions
    0..T-1 and segment id 1 (one segment per row), all int32 [rows, T], so the shared trainer's loss applies
    unchanged. The state is the next step; a Grain `DatasetIterator`, so `grain.checkpoint.CheckpointSave`
    stores it in an orbax checkpoint."""

    data: CharData
    split: Split
    batch_size: int
    block_size: int
    seed: int
    process_index: int | None = None
    process_count: int | None = None
    step: int = 0

    def __post_init__(self):
        super().__init__()

    def __next__(self) -> dict[str, np.ndarray]:
        x, y = self.data.get_batch(
            self.split,
            self.batch_size,
            self.block_size,
            seed=self.seed,
            step=self.step,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        self.step += 1
        positions = np.broadcast_to(np.arange(x.shape[1], dtype=np.int32), x.shape).copy()
        return {"input_ids": x, "positions": positions, "segment_ids": np.ones_like(x), "targets": y}

    def _stream(self) -> dict[str, Any]:
        return {"split": self.split, "batch_size": self.batch_size, "block_size": self.block_size, "seed": self.seed}

    def get_state(self) -> dict[str, Any]:
        """The next step and what the stream is drawn with (a JSON-serialisable dict)."""
        return {"step": self.step, **self._stream()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a state of `get_state`; raises if it belongs to another split, shape or seed."""
        if {k: state.get(k) for k in self._stream()} != self._stream():
            raise ValueError(f"iterator state {dict(state)} does not match this stream {self._stream()}")
        self.step = int(state["step"])
