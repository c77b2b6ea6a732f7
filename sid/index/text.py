"""Text embeddings: each item's title and description through a local HF Qwen2 (sid's own implementation),
final hidden states mean-pooled over the item's tokens in f32.

Items are right-padded to `max_tokens` so one compiled forward pass serves every batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int
from tqdm import tqdm

from sid.compat.hf import load_qwen2
from sid.data.config import TokenizerConfig
from sid.data.minionerec import description_entries, read_json_object
from sid.data.tokenizer import build_tokenizer
from sid.index.config import EmbedConfig
from sid.index.embed import EmbeddingError
from sid.models.config import ModelConfig
from sid.models.qwen2 import Qwen2


def item_texts(path: Path, item_ids: Sequence[int]) -> list[str]:
    """Each item's title and its description's entries, from `{category}.item.json`; a missing item or text is an
    error."""
    if not path.is_file():
        raise FileNotFoundError(f"item file {path} not found (text embeddings need titles)")
    entries = {key: (value, line) for key, value, line in read_json_object(path)}
    if not entries:
        raise EmbeddingError(path, None, None, "the item file has no items")
    texts = []
    for item in item_ids:
        if str(item) not in entries:
            raise EmbeddingError(path, None, f"item {item}", "item is not in the item file")
        value, line = entries[str(item)]
        if not isinstance(value, dict):
            raise EmbeddingError(path, line, f"item {item}", "expected an object with 'title' / 'description'")
        title = value.get("title")
        parts = [title.strip()] if isinstance(title, str) else []
        text = " ".join(p for p in parts + description_entries(value.get("description")) if p)
        if not text:
            raise EmbeddingError(path, line, f"item {item}", "no title or description text")
        texts.append(text)
    return texts


@eqx.filter_jit
def pooled(model: Qwen2, ids: Int[Array, "batch seq"], lengths: Int[Array, " batch"]) -> Float[Array, "batch embed"]:
    """Mean of the final hidden states over each row's first `lengths` tokens (f32)."""
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    real = positions < lengths[:, None]
    hidden = model(ids, positions, real.astype(jnp.int32)).astype(jnp.float32)
    total = jnp.sum(jnp.where(real[..., None], hidden, 0.0), axis=1)
    return total / jnp.maximum(lengths, 1)[:, None].astype(jnp.float32)


def text_embeddings(cfg: EmbedConfig, item_json: Path, item_ids: Sequence[int]) -> np.ndarray:
    """[items, hidden] embeddings of the items' texts."""
    if not cfg.model_dir:
        raise FileNotFoundError("embed.source=text needs embed.model_dir (a local HF Qwen2 directory)")
    texts = item_texts(item_json, item_ids)
    model_dir = Path(cfg.model_dir).expanduser().resolve()
    tok = build_tokenizer(TokenizerConfig(path=str(model_dir), add_sid_tokens=False), None)
    model, _ = load_qwen2(model_dir, dataclasses.replace(ModelConfig(), compute_dtype=cfg.compute_dtype, remat="none"))
    ids = np.full((len(texts), cfg.max_tokens), tok.pad_id, np.int32)
    lengths = np.zeros(len(texts), np.int32)
    for row, encoded in enumerate(tok.encode_batch(texts)):
        encoded = encoded[: cfg.max_tokens]
        ids[row, : len(encoded)], lengths[row] = encoded, len(encoded)
    out = []
    for start in tqdm(range(0, len(texts), cfg.batch_size), desc="text embeddings", unit="batch"):
        batch_ids, batch_len = ids[start : start + cfg.batch_size], lengths[start : start + cfg.batch_size]
        pad = cfg.batch_size - len(batch_ids)  # the last batch is padded so its shape matches the others
        batch_ids = np.pad(batch_ids, ((0, pad), (0, 0)), constant_values=tok.pad_id)
        out.append(
            np.asarray(pooled(model, jnp.asarray(batch_ids), jnp.asarray(np.pad(batch_len, (0, pad)))))[
                : len(texts) - start
            ]
        )
    return np.concatenate(out)
