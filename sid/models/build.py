"""Build the Qwen2 a run trains: from an HF checkpoint or from scratch, with the vocab made to fit the tokenizer
(SID tokens added, new rows initialised per config) and padded to the mesh's multiple."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from sid.data.tokenizer import SIDTokenizer
from sid.models.config import ModelConfig
from sid.models.qwen2 import Qwen2, pad_vocab, resize_vocab, unpad_vocab


def build_model(cfg: ModelConfig, tok: SIDTokenizer, pretrained: Qwen2 | None = None) -> tuple[Qwen2, dict[str, Any]]:
    """The model with rows for every tokenizer id (valid_vocab = tokenizer size), padded to cfg.vocab_multiple.

    `pretrained` is `cfg.hf_path`'s model, loaded by the caller (`sid.compat.hf.load_qwen2`), or None to initialise
    from scratch. From a checkpoint, ids below the base tokenizer's size keep their trained rows; every id above
    (the SID tokens) gets a new row per cfg.new_token_init. Rows the checkpoint has beyond its tokenizer (Qwen's 151,936
    vs ~151.6k tokens) are dropped before padding, so they can never be produced. Returns the vocab_resize record.
    """
    if bool(cfg.hf_path) != (pretrained is not None):
        raise ValueError(f"model.hf_path={cfg.hf_path!r} needs its loaded model, and only then (pretrained)")
    if pretrained is not None:
        model = pretrained
        source = {"checkpoint_rows": int(model.embed.weight.shape[0]), "checkpoint_valid_vocab": model.valid_vocab}
        existing = min(tok.base_vocab_size, model.valid_vocab)
        if tok.vocab_size < existing:
            raise ValueError(f"tokenizer has {tok.vocab_size} tokens but the checkpoint was trained on {existing}")
        model = resize_vocab(model, tok.vocab_size, num_existing=existing)
    else:
        vocab = cfg.vocab_size or tok.vocab_size
        if vocab < tok.vocab_size:
            raise ValueError(f"model.vocab_size={vocab} is smaller than the tokenizer ({tok.vocab_size} tokens)")
        model = Qwen2.init(dataclasses.replace(cfg, vocab_size=vocab), key=jax.random.key(cfg.seed))
        model = resize_vocab(model, tok.vocab_size, num_existing=tok.vocab_size)
        source = {"checkpoint_rows": None, "checkpoint_valid_vocab": None}
        existing = tok.vocab_size
    model = pad_vocab(unpad_vocab(model), cfg.vocab_multiple)
    info = {
        **source,
        "tokenizer_base_vocab": tok.base_vocab_size,
        "tokenizer_vocab": tok.vocab_size,
        "new_rows": tok.vocab_size - existing,
        "new_row_init": cfg.new_token_init if tok.vocab_size > existing else None,
        "rows": int(model.embed.weight.shape[0]),
        "vocab_multiple": cfg.vocab_multiple,
        "valid_vocab": model.valid_vocab,
    }
    return model, info


def token_extension(tok: SIDTokenizer) -> dict[str, Any]:
    """What the tokenizer gained: the run_summary.json record."""
    return {
        "base_vocab_size": tok.base_vocab_size,
        "sid_tokens": len(tok.sid_tokens),
        "sid_tokens_added": tok.vocab_size - tok.base_vocab_size,
        "sid_levels": tok.sid_levels,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
    }
