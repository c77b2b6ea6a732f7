"""HF Qwen2 import/export against transformers: logits (tied/untied, GQA, left/right padding), cached greedy
decoding vs `generate`, export -> `from_pretrained`, sharded checkpoints, rope_theta defaults, bad checkpoints."""

import json
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from sid.compat.hf import export_qwen2, load_qwen2  # noqa: E402
from sid.models.config import ModelConfig  # noqa: E402
from sid.models.qwen2 import Qwen2, pad_vocab, resize_vocab  # noqa: E402

VOCAB = 300  # room for a byte-level BPE tokenizer (256 byte symbols) in the export test
F32 = ModelConfig(compute_dtype="float32", remat="none")


def _hf_model(tied: bool, kv_heads: int, rope_theta: float = 10_000.0, seed: int = 0):
    """A tiny random HF Qwen2 with O(1) logits (weights larger than the init, norms away from 1)."""
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory written by save_pretrained, the torch model). Tied uses 4 query heads per kv head."""
    out = {}
    for name, tied, kv in [("tied", True, 1), ("untied", False, 2)]:
        model = _hf_model(tied, kv)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path, safe_serialization=True)
        out[name] = (path, model)
    return out


@eqx.filter_jit
def our_logits(model: Qwen2, ids, positions, segments):
    return model.logits(model(ids, positions, segments))


def _hf_logits(model, ids, mask, positions):
    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(positions),
        )
    return out.logits.numpy()


def _padded_batch(side: str, width: int = 10, lengths=(10, 6, 3), seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, (len(lengths), width)).astype(np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lengths):
        if side == "left":
            mask[i, width - n :] = 1
        else:
            mask[i, :n] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, positions


@pytest.mark.parametrize("name", ["tied", "untied"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_logits_match_transformers(checkpoints, name, side):
    path, hf = checkpoints[name]
    model, cfg = load_qwen2(path, F32)
    assert cfg.tie_word_embeddings == (name == "tied") and (model.lm_head is None) == (name == "tied")
    assert cfg.num_kv_heads < cfg.num_heads and cfg.rope_theta == 10_000.0 and cfg.hf_path == str(path)
    ids, mask, positions = _padded_batch(side)
    expected = _hf_logits(hf, ids, mask, positions)
    got = np.asarray(
        our_logits(model, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32), jnp.asarray(mask, jnp.int32))
    )
    real = mask.astype(bool)
    assert np.abs(expected[real]).mean() > 0.3
    np.testing.assert_allclose(got[real], expected[real], atol=1e-4)


def test_cached_greedy_decoding_matches_generate(checkpoints):
    path, hf = checkpoints["untied"]
    model, _ = load_qwen2(path, F32)
    ids, mask, positions = _padded_batch("left", width=8, lengths=(8, 5, 2), seed=1)
    steps = 6
    with torch.no_grad():
        expected = hf.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
        )[:, ids.shape[1] :].numpy()
    hidden, prefix = eqx.filter_jit(Qwen2.prefill)(
        model, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32), jnp.asarray(mask, bool)
    )
    suffix, lengths, tokens = model.init_suffix_cache(3, 1, steps), mask.sum(1), []
    step = eqx.filter_jit(Qwen2.decode)
    for t in range(steps):
        token = jnp.argmax(model.logits(hidden).reshape(3, -1), axis=-1).astype(jnp.int32)
        tokens.append(np.asarray(token))
        hidden, suffix = step(model, token[:, None], jnp.asarray(lengths + t, jnp.int32)[:, None], prefix, suffix)
    np.testing.assert_array_equal(np.stack(tokens, axis=1), expected)


def _qwen_style_tokenizer():
    """A tiny byte-level BPE with Qwen2's pipeline (NFC, Qwen's split regex, byte-level), a few merges, an
    <|endoftext|> special token and two SID tokens: what sid's tokenizer is, at a size that fits the model."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("o", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.add_tokens(["<a_1>", "<b_22>"])
    return tok


@pytest.mark.parametrize("name", ["tied", "untied"])
def test_export_then_transformers_loads_same_logits(checkpoints, tmp_path, name):
    path, _ = checkpoints[name]
    model, _ = load_qwen2(path, F32)
    padded = pad_vocab(model, 64)  # 300 -> 320 rows, valid_vocab stays 300
    tokenizer = _qwen_style_tokenizer()
    out = export_qwen2(padded, tmp_path / "export", tokenizer, eos_token="<|endoftext|>")

    config = json.loads((out / "config.json").read_text())
    eos_id = tokenizer.token_to_id("<|endoftext|>")
    assert config["vocab_size"] == 320 and config["sid_valid_vocab"] == VOCAB and config["eos_token_id"] == eos_id
    hf = transformers.Qwen2ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert hf.config.tie_word_embeddings == (name == "tied") and hf.config.rope_parameters["rope_theta"] == 10_000.0
    ids, mask, positions = _padded_batch("left", seed=2)
    expected = _hf_logits(hf, ids, mask, positions)
    got = np.asarray(
        our_logits(padded, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32), jnp.asarray(mask, jnp.int32))
    )
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real][:, :VOCAB], expected[real][:, :VOCAB], atol=1e-4)

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "hello world 123 <a_1><b_22> héllo<|endoftext|>"
    ids = tokenizer.encode(text).ids
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids and len(ids) > 15
    assert hf_tok.eos_token_id == eos_id and hf_tok.convert_tokens_to_ids("<b_22>") == tokenizer.token_to_id("<b_22>")

    again, cfg = load_qwen2(out, F32)  # our own export round-trips, valid_vocab included
    assert again.valid_vocab == VOCAB and cfg.vocab_size == 320
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(padded), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    with pytest.raises(ValueError, match="resize_vocab"):  # a tokenizer with ids the model would mask
        export_qwen2(resize_vocab(model, 200, num_existing=200), tmp_path / "bad", tokenizer)


def test_sharded_checkpoint_loads(checkpoints, tmp_path):
    path, hf = checkpoints["untied"]
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    sharded, _ = load_qwen2(tmp_path, F32)
    single, _ = load_qwen2(path, F32)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("spelling", ["missing", "top_level"])
def test_rope_theta_from_config_json(tmp_path, spelling):
    # The HF model really uses theta (1e6 for the missing key, which is then our default; 5e5 given the v4 key).
    theta = 1_000_000.0 if spelling == "missing" else 500_000.0
    hf = _hf_model(tied=True, kv_heads=2, rope_theta=theta, seed=3)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.pop("rope_theta", None)
    if spelling == "top_level":
        config["rope_theta"] = theta
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, cfg = load_qwen2(tmp_path, F32)
    assert cfg.rope_theta == theta
    # Positions far enough apart that theta matters.
    ids, mask = np.random.default_rng(4).integers(0, VOCAB, (1, 6)), np.ones((1, 6), np.int64)
    positions = np.array([[0, 5, 20, 40, 80, 120]])
    expected = _hf_logits(hf, ids, mask, positions)
    got = our_logits(
        model, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32), jnp.asarray(mask, jnp.int32)
    )
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)


def test_bad_checkpoints_fail_clearly(checkpoints, tmp_path, monkeypatch):
    path, _ = checkpoints["untied"]
    tensors = load_file(path / "model.safetensors")

    missing = tmp_path / "missing"
    shutil.copytree(path, missing)
    save_file(
        {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"}, missing / "model.safetensors"
    )
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        load_qwen2(missing)

    extra = tmp_path / "extra"
    shutil.copytree(path, extra)
    save_file(
        {**tensors, "model.layers.0.self_attn.q_norm.weight": np.ones(12, np.float32)}, extra / "model.safetensors"
    )
    with pytest.raises(ValueError, match="unexpected tensors"):
        load_qwen2(extra)

    wrong_shape = tmp_path / "wrong_shape"
    shutil.copytree(path, wrong_shape)
    config = json.loads((path / "config.json").read_text())
    (wrong_shape / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight"):
        load_qwen2(wrong_shape)
    (wrong_shape / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match="qwen2"):
        load_qwen2(wrong_shape)

    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_qwen2(tmp_path / "does" / "not" / "exist")

    # A hub id is resolved only through huggingface_hub (faked here: no network in tests).
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: calls.append(repo_id) or str(path))
    model, cfg = load_qwen2("Qwen/Tiny-Test", F32)
    assert calls == ["Qwen/Tiny-Test"] and cfg.hf_path == "Qwen/Tiny-Test" and model.lm_head is not None

    def offline(repo_id, **kw):
        raise OSError("no connection")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="could not be downloaded"):
        load_qwen2("Qwen/Tiny-Test")
