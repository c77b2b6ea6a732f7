"""nanoGPT: parameter count vs Karpathy's report, logits vs HF GPT-2 (the same architecture), dropout and causality."""

import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sid.models.config import GPTConfig
from sid.models.nanogpt import GPT

TINY = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=32, dropout=0.0, compute_dtype="float32")
init = eqx.filter_jit(GPT.init)


@eqx.filter_jit
def logits(model: GPT, idx, key=None):
    return model.logits(model(idx, key=key))


def test_param_count_matches_karpathy_shakespeare_char():
    # nanoGPT's README/train log for config/train_shakespeare_char.py reports "number of parameters: 10.65M",
    # counted without the position embeddings (get_num_params(non_embedding=True)).
    cfg = GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=False)
    model = eqx.filter_eval_shape(GPT.init, cfg, key=jax.random.key(0))
    n = model.num_params()
    assert round(n / 1e6, 2) == 10.65
    d, per_layer = 384, 2 * 384 + 384 * 3 * 384 + 384 * 384 + 384 * 4 * 384 + 4 * 384 * 384
    assert n == 6 * per_layer + 65 * d + d  # blocks + tied wte + ln_f, no biases
    assert model.num_params(non_embedding=False) == n + 256 * d
    assert model.layers.attn.c_attn.weight.shape == (6, 3 * d, d)  # stacked for the scan, (out, in) layout


def test_init_scales_residual_projections():
    cfg = dataclasses.replace(TINY, n_layer=8, n_embd=128, n_head=4)
    model = init(cfg, key=jax.random.key(0))
    assert float(jnp.std(model.layers.attn.c_attn.weight)) == pytest.approx(0.02, rel=0.05)
    assert float(jnp.std(model.wte)) == pytest.approx(0.02, rel=0.1)
    for w in (model.layers.attn.c_proj.weight, model.layers.mlp.c_proj.weight):
        assert float(jnp.std(w)) == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert model.layers.ln_1.bias is None and model.layers.attn.c_attn.bias is None  # bias=False


def _from_hf_gpt2(hf_model, cfg: GPTConfig) -> GPT:
    """Our GPT with the weights of an HF GPT2LMHeadModel (Conv1D stores (in, out): transpose)."""
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}

    def stacked(name, transpose=False):
        arrays = [sd[f"transformer.h.{i}.{name}"] for i in range(cfg.n_layer)]
        return jnp.asarray(np.stack([a.T if transpose else a for a in arrays]))

    model = init(cfg, key=jax.random.key(0))
    where = {
        lambda m: m.wte: jnp.asarray(sd["transformer.wte.weight"]),
        lambda m: m.wpe: jnp.asarray(sd["transformer.wpe.weight"]),
        lambda m: m.ln_f.weight: jnp.asarray(sd["transformer.ln_f.weight"]),
        lambda m: m.ln_f.bias: jnp.asarray(sd["transformer.ln_f.bias"]),
        lambda m: m.layers.ln_1.weight: stacked("ln_1.weight"),
        lambda m: m.layers.ln_1.bias: stacked("ln_1.bias"),
        lambda m: m.layers.ln_2.weight: stacked("ln_2.weight"),
        lambda m: m.layers.ln_2.bias: stacked("ln_2.bias"),
    }
    for ours, theirs in [("attn.c_attn", "attn.c_attn"), ("attn.c_proj", "attn.c_proj"), ("mlp.c_fc", "mlp.c_fc")]:
        where[lambda m, p=ours: _get(m.layers, p).weight] = stacked(f"{theirs}.weight", transpose=True)
        where[lambda m, p=ours: _get(m.layers, p).bias] = stacked(f"{theirs}.bias")
    where[lambda m: m.layers.mlp.c_proj.weight] = stacked("mlp.c_proj.weight", transpose=True)
    where[lambda m: m.layers.mlp.c_proj.bias] = stacked("mlp.c_proj.bias")
    for get, value in where.items():
        assert get(model).shape == value.shape
        model = eqx.tree_at(get, model, value)
    return model


def _get(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def test_logits_match_hf_gpt2():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = dataclasses.replace(TINY, bias=True)
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function="gelu",  # nanoGPT's exact GELU (HF's GPT-2 default is the tanh approximation)
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
    )
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # larger weights than the init so a wrong layer would show above the tolerance
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "ln" in name and "weight" in name else 0.2 * torch.randn_like(p))
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.block_size))
    with torch.no_grad():
        expected = hf(torch.as_tensor(idx)).logits.numpy()
    model = _from_hf_gpt2(hf, cfg)
    got = np.asarray(logits(model, jnp.asarray(idx, jnp.int32)))
    assert np.abs(expected).mean() > 0.3
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_no_key_is_deterministic_and_key_turns_dropout_on():
    cfg = dataclasses.replace(TINY, dropout=0.3)
    model = init(cfg, key=jax.random.key(1))
    idx = jax.random.randint(jax.random.key(2), (2, 12), 0, cfg.vocab_size)
    a, b = logits(model, idx), logits(model, idx)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    d1, d1_again = logits(model, idx, jax.random.key(3)), logits(model, idx, jax.random.key(3))
    d2 = logits(model, idx, jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d1_again))
    assert not np.allclose(np.asarray(d1), np.asarray(a), atol=1e-3)
    assert not np.allclose(np.asarray(d1), np.asarray(d2), atol=1e-3)


def test_training_attention_path_equals_eval_path_without_dropout():
    # With a key the attention is spelled out (to drop weights); at dropout 0 it must equal the fused path.
    model = init(TINY, key=jax.random.key(5))
    idx = jax.random.randint(jax.random.key(6), (2, 16), 0, TINY.vocab_size)
    np.testing.assert_allclose(
        np.asarray(logits(model, idx, jax.random.key(7))), np.asarray(logits(model, idx)), atol=1e-5
    )


@pytest.mark.parametrize("with_key", [False, True])
def test_causal(with_key):
    model = init(TINY, key=jax.random.key(8))
    idx = jax.random.randint(jax.random.key(9), (1, 16), 0, TINY.vocab_size)
    changed = idx.at[0, 10].set((idx[0, 10] + 1) % TINY.vocab_size)
    key = jax.random.key(10) if with_key else None
    a, b = np.asarray(logits(model, idx, key)), np.asarray(logits(model, changed, key))
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert not np.allclose(a[:, 10:], b[:, 10:])


def test_bf16_compute_and_bad_input():
    cfg = dataclasses.replace(TINY, compute_dtype="bfloat16", remat="full")
    model = init(cfg, key=jax.random.key(11))
    idx = jax.random.randint(jax.random.key(12), (2, 16), 0, cfg.vocab_size)
    hidden = model(idx)
    assert hidden.dtype == jnp.bfloat16 and model.logits(hidden).dtype == jnp.float32
    assert model.wte.dtype == jnp.float32 and model.layers.mlp.c_fc.weight.dtype == jnp.float32
    f32 = dataclasses.replace(model, config=TINY)
    np.testing.assert_allclose(np.asarray(model.logits(hidden)), np.asarray(f32.logits(f32(idx))), atol=0.05, rtol=0.05)
    with pytest.raises(ValueError, match="block_size"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="vocab_size"):
        GPT.init(dataclasses.replace(cfg, vocab_size=0), key=jax.random.key(0))
    with pytest.raises(ValueError, match="model.scan_unroll"):
        GPT.init(dataclasses.replace(cfg, scan_unroll=0), key=jax.random.key(0))


def test_unrolled_block_scan_equals_rolled_with_dropout():
    model = init(dataclasses.replace(TINY, dropout=0.2), key=jax.random.key(11))
    idx = jax.random.randint(jax.random.key(12), (2, 16), 0, TINY.vocab_size)
    unrolled = dataclasses.replace(model, config=dataclasses.replace(model.config, scan_unroll=TINY.n_layer))
    key = jax.random.key(13)
    np.testing.assert_allclose(np.asarray(logits(unrolled, idx, key)), np.asarray(logits(model, idx, key)), atol=1e-5)
    assert not np.allclose(np.asarray(logits(model, idx, key)), np.asarray(logits(model, idx)), atol=1e-3)
