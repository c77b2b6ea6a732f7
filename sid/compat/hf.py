"""Hugging Face Qwen2 checkpoints: import (config.json + safetensors, single or sharded) and export.

Import reads tensors with `safetensors`' NumPy backend, so no torch is needed at runtime; a hub id is downloaded
with `huggingface_hub` only when the path does not exist locally. Export writes model.safetensors + config.json
(+ tokenizer.json / tokenizer_config.json) that `transformers.Qwen2ForCausalLM.from_pretrained` loads.

Vocab rows on export: the embedding (and untied head) keep all their rows, and config.json's `vocab_size` is that
row count, because HF requires vocab_size to equal the rows and a mesh-friendly multiple is also what serving
stacks like. Rows at ids >= valid_vocab are never emitted by our tokenizer, but HF does not mask their logits;
we store valid_vocab as `sid_valid_vocab` in config.json (HF keeps unknown keys) so `load_qwen2` restores the
mask. Padding rows are zero, so their logit is exactly 0 in HF; a served model should restrict sampling to the
tokenizer's ids (as Qwen's own checkpoints, with 290 unused rows, already require).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from sid.atomic import atomic_path
from sid.models.config import ModelConfig
from sid.models.qwen2 import Qwen2, Qwen2Layer, resize_vocab

DEFAULT_ROPE_THETA = 1_000_000.0
"""Qwen2/Qwen2.5's RoPE base, used when config.json has no rope_theta (transformers v5 moved the key)."""

VALID_VOCAB_KEY = "sid_valid_vocab"
"""config.json key recording how many rows are real tokens (ours; HF keeps and ignores it)."""

# One table for both directions: HF tensor name (per layer, after `model.layers.N.`) -> our stacked array.
_LAYER_TENSORS: tuple[tuple[str, Callable[[Qwen2Layer], Any]], ...] = (
    ("input_layernorm.weight", lambda l: l.attn_norm.weight),
    ("self_attn.q_proj.weight", lambda l: l.attn.q_proj.weight),
    ("self_attn.q_proj.bias", lambda l: l.attn.q_proj.bias),
    ("self_attn.k_proj.weight", lambda l: l.attn.k_proj.weight),
    ("self_attn.k_proj.bias", lambda l: l.attn.k_proj.bias),
    ("self_attn.v_proj.weight", lambda l: l.attn.v_proj.weight),
    ("self_attn.v_proj.bias", lambda l: l.attn.v_proj.bias),
    ("self_attn.o_proj.weight", lambda l: l.attn.o_proj.weight),
    ("post_attention_layernorm.weight", lambda l: l.mlp_norm.weight),
    ("mlp.gate_proj.weight", lambda l: l.mlp.gate_proj.weight),
    ("mlp.up_proj.weight", lambda l: l.mlp.up_proj.weight),
    ("mlp.down_proj.weight", lambda l: l.mlp.down_proj.weight),
)


def hf_model_dir(path: str | Path) -> Path | None:
    """The HF model directory `path` names: a run directory's export (RUN_DIR/model) or an HF directory itself;
    None when neither holds a config.json."""
    p = Path(path)
    return next((d for d in (p / "model", p) if (d / "config.json").is_file()), None)


def _top_tensors(tied: bool) -> tuple[tuple[str, Callable[[Qwen2], Any]], ...]:
    top = (
        ("model.embed_tokens.weight", lambda m: m.embed.weight),
        ("model.norm.weight", lambda m: m.final_norm.weight),
    )
    return top if tied else (*top, ("lm_head.weight", lambda m: m.lm_head.weight))


def config_from_hf(hf: dict[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """A ModelConfig whose architecture comes from an HF Qwen2 config.json dict and whose other fields (numerics,
    remat, attention, vocab handling) come from `base`. Missing keys take HF Qwen2Config's defaults, except
    rope_theta, which is 1e6 (Qwen2/2.5's value) when neither `rope_parameters` nor `rope_theta` gives it."""
    if hf.get("model_type") != "qwen2":
        raise ValueError(f"expected an HF config with model_type 'qwen2', got {hf.get('model_type')!r}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"Qwen2 uses hidden_act 'silu', config has {hf['hidden_act']!r}")
    if hf.get("use_sliding_window", False):
        raise NotImplementedError("sliding-window attention (use_sliding_window: true) is not supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"RoPE scaling {rope_type!r} is not supported (only 'default')")
    heads = hf["num_attention_heads"]
    return dataclasses.replace(
        base or ModelConfig(),
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", DEFAULT_ROPE_THETA))),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
    )


def resolve_checkpoint(path_or_hub_id: str | Path) -> Path:
    """A local directory as is; otherwise a hub id (`Qwen/Qwen2.5-1.5B`) downloaded with huggingface_hub."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_hub_id)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.startswith("."):
        raise FileNotFoundError(f"{name!r} is not a checkpoint directory (and does not look like a hub id)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise RuntimeError(
            f"{name!r} is not a local directory; downloading it needs `pip install huggingface_hub`"
        ) from e
    try:
        patterns = ["*.json", "*.safetensors", "merges.txt", "vocab.json"]
        return Path(snapshot_download(repo_id=name, allow_patterns=patterns))
    except Exception as e:
        raise FileNotFoundError(
            f"{name!r} is not a local directory and could not be downloaded from the hub: {e}"
        ) from e


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{directory} has neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, framework="numpy") as f:
        return dict.fromkeys(f.keys(), single)


def load_qwen2(path_or_hub_id: str | Path, cfg: ModelConfig | None = None) -> tuple[Qwen2, ModelConfig]:
    """Load an HF Qwen2 checkpoint (local dir or hub id) as float32 params.

    Architecture comes from config.json; every other field of the returned config comes from `cfg` (default
    ModelConfig()), with hf_path set. valid_vocab is config.json's `sid_valid_vocab` when we exported it, else
    all rows: call `resize_vocab(model, len(tokenizer), num_existing=...)` to mask rows the tokenizer never uses.
    """
    directory = resolve_checkpoint(path_or_hub_id)
    hf = json.loads((directory / "config.json").read_text())
    cfg = config_from_hf(hf, dataclasses.replace(cfg or ModelConfig(), hf_path=str(path_or_hub_id)))
    skeleton = eqx.filter_eval_shape(Qwen2.init, cfg, key=jax.random.key(0))
    files = _tensor_files(directory)
    consumed = set()
    getters, values = [], []
    with ExitStack() as stack:
        handles = {p: stack.enter_context(safe_open(p, framework="numpy")) for p in set(files.values())}

        def read(name: str, shape: tuple[int, ...]) -> np.ndarray:
            if name not in files:
                raise KeyError(f"{directory}: tensor {name!r} is missing from the checkpoint")
            consumed.add(name)
            array = np.asarray(handles[files[name]].get_tensor(name), dtype=np.float32)
            if array.shape != shape:
                raise ValueError(f"{name}: shape {array.shape}, but config.json implies {shape}")
            return array

        for name, get in _top_tensors(cfg.tie_word_embeddings):
            getters.append(get)
            values.append(read(name, get(skeleton).shape))
        for suffix, get in _LAYER_TENSORS:
            shape = get(skeleton.layers).shape[1:]  # drop the stacked [num_layers] axis
            getters.append(lambda m, get=get: get(m.layers))
            values.append(np.stack([read(f"model.layers.{i}.{suffix}", shape) for i in range(cfg.num_layers)]))
    # Tied checkpoints sometimes also store lm_head.weight; rotary inv_freq buffers are recomputed.
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(n for n in files if n not in consumed and n not in ignorable and "rotary_emb" not in n)
    if unexpected:
        raise ValueError(f"{directory}: unexpected tensors for Qwen2 {unexpected[:5]} ({len(unexpected)} in all)")
    model = eqx.tree_at(lambda m: [g(m) for g in getters], skeleton, replace=[jnp.asarray(v) for v in values])
    valid = hf.get(VALID_VOCAB_KEY, cfg.vocab_size)
    if valid != cfg.vocab_size:
        model = resize_vocab(model, valid, num_existing=valid)
    return model, cfg


def export_qwen2(
    model: Qwen2,
    out_dir: str | Path,
    tokenizer: Any | None = None,
    *,
    eos_token: str | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
) -> Path:
    """Write `model` as an HF Qwen2 checkpoint: model.safetensors (float32 by default, lossless; 'bfloat16'
    halves it) and config.json; given a `tokenizers.Tokenizer` (Qwen's byte-level BPE, plus added tokens such
    as SIDs), also tokenizer.json and a minimal tokenizer_config.json (`eos_token`, if given, becomes the
    EOS/pad token there and in config.json).
    All embedding rows are written (see the module docstring). Arrays must be addressable from this process.
    The directory appears whole or not at all: it is written beside `out_dir`, then renamed over it."""
    if tokenizer is not None and tokenizer.get_vocab_size(with_added_tokens=True) > model.valid_vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_vocab_size(with_added_tokens=True)} tokens but the model only "
            f"{model.valid_vocab} valid rows: resize_vocab the model to the tokenizer first"
        )
    eos_id = None
    if eos_token is not None:
        eos_id = None if tokenizer is None else tokenizer.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"eos_token {eos_token!r} needs a tokenizer that contains it")
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        save_file(_export_tensors(model, dtype), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(_hf_config(model, dtype, eos_id), indent=2) + "\n")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, tmp, model.config.max_position_embeddings, eos_token)
    return out


def _export_tensors(model: Qwen2, dtype: str) -> dict[str, np.ndarray]:
    """HF tensor name -> host array in `dtype`, every layer unstacked."""
    np_dtype = np.float32 if dtype == "float32" else jnp.bfloat16
    host = jax.device_get(model)

    def as_np(x: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(x, dtype=np.float32).astype(np_dtype))

    tensors = {name: as_np(get(host)) for name, get in _top_tensors(model.config.tie_word_embeddings)}
    for suffix, get in _LAYER_TENSORS:
        stacked = get(host.layers)
        for i in range(model.config.num_layers):
            tensors[f"model.layers.{i}.{suffix}"] = as_np(stacked[i])
    return tensors


def _hf_config(model: Qwen2, dtype: str, eos_id: int | None) -> dict[str, Any]:
    """config.json of the export (Qwen2ForCausalLM)."""
    cfg = model.config
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        VALID_VOCAB_KEY: model.valid_vocab,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        # Both spellings: transformers v5 reads rope_parameters, v4 (and vLLM on it) reads rope_theta.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "attention_dropout": cfg.attention_dropout,
        "initializer_range": cfg.init_std,
        "torch_dtype": dtype,
        "eos_token_id": eos_id,
        "bos_token_id": None,
    }


def _save_tokenizer(tokenizer: Any, out: Path, max_length: int, eos_token: str | None) -> None:
    tokenizer.save(str(out / "tokenizer.json"))
    # Qwen2Tokenizer: transformers v4 reads tokenizer.json as is; v5 (which forces this class for qwen2
    # models) rebuilds Qwen's byte-level BPE pipeline around the vocab, merges and added tokens in it.
    tok_config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
    }
    if eos_token is not None:
        tok_config |= {"eos_token": eos_token, "pad_token": eos_token}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
