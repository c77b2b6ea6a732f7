"""Qwen2 model behaviour without HF: packing/padding masks, KV-cached decoding vs uncached runs, vocab resizing,
remat and dtypes. (Logits and generation against transformers are in test_hf_compat.py.)"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_qwen2

from sid.models.qwen2 import (
    SHARED_SEGMENT,
    Qwen2,
    attention_mask,
    pad_vocab,
    prefix_segments,
    resize_vocab,
    unpad_vocab,
)

# init_std 0.2 gives O(1) logits, so a masking or cache bug shows far above the tolerances.
CFG = tiny_qwen2(vocab_size=96, rope_theta=10_000.0, init_std=0.2)


@pytest.fixture(scope="module")
def model() -> Qwen2:
    return eqx.filter_jit(Qwen2.init)(CFG, key=jax.random.key(0))


@eqx.filter_jit
def forward_logits(model: Qwen2, ids, positions, segments):
    return model.logits(model(ids, positions, segments))


@eqx.filter_jit
def prefill(m, ids, pos, mask):
    hidden, prefix = m.prefill(ids, pos, mask)
    return m.logits(hidden), prefix


@eqx.filter_jit
def decode(m, tok, pos, prefix, suffix):
    hidden, suffix = m.decode(tok, pos, prefix, suffix)
    return m.logits(hidden), suffix


def _row(*parts):
    return jnp.asarray(np.concatenate(parts)[None], jnp.int32)


def test_packed_segments_equal_separate_runs(model):
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, CFG.vocab_size, 5), rng.integers(0, CFG.vocab_size, 4)
    ids = _row(a, b, [7, 7, 7])
    positions = _row(np.arange(5), np.arange(4), [0, 0, 0])
    segments = _row([1] * 5, [2] * 4, [0] * 3)
    packed = np.asarray(forward_logits(model, ids, positions, segments))[0]
    for tokens, start in [(a, 0), (b, 5)]:
        n = len(tokens)
        alone = np.asarray(forward_logits(model, _row(tokens), _row(np.arange(n)), _row(np.ones(n))))[0]
        np.testing.assert_allclose(packed[start : start + n], alone, atol=1e-5)
    assert not np.allclose(packed[5], packed[0], atol=1e-2)  # a different context gives different logits


def _left_padded_prompts(rng, lengths, width):
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros((len(lengths), width), bool)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = rng.integers(0, CFG.vocab_size, n)
        mask[i, width - n :] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return ids, mask, positions


def _uncached_last_logits(model, ids, mask, width=16):
    """Logits at the last column of left-padded rows, by a full forward pass without cache. Rows are also
    right-padded to a fixed width (one compile; right padding must not change anything either)."""
    n = ids.shape[1]
    ids, mask = np.pad(ids, ((0, 0), (0, width - n)), constant_values=5), np.pad(mask, ((0, 0), (0, width - n)))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    out = forward_logits(model, jnp.asarray(ids), jnp.asarray(positions, jnp.int32), jnp.asarray(mask, jnp.int32))
    return np.asarray(out)[:, n - 1]


def test_attention_mask_shared_prefixes_by_their_contract():
    """Two shared prefixes in one row (as the RL stage packs prompts with their completions): a query sees its own
    segment causally and its own prefix only; a prefix sees itself; padding sees padding and prefix 0."""
    p0, m0 = prefix_segments(0, 2)
    p1, m1 = prefix_segments(1, 3)
    assert p0 == SHARED_SEGMENT and list(m0) == [1, 2] and p1 == -2 and list(m1) == [65537, 65538, 65539]
    segments = [p0, p0, m0[0], m0[1], m0[1], p1, m1[0], m1[2], m1[2], 0, 0]
    prefix_of = {**{m: p0 for m in m0}, **{m: p1 for m in m1}, 0: p0}
    order = np.arange(len(segments))
    got = np.asarray(attention_mask(*(jnp.asarray([a]) for a in (segments, order, segments, order))))[0, 0]
    want = [[k <= q and (segments[k] == segments[q] or segments[k] == prefix_of.get(segments[q])) for k in order]
            for q in order]  # fmt: skip
    np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="1 to 65535 member segments, not 65536"):
        prefix_segments(0, 65536)


def test_cached_greedy_decoding_equals_uncached(model):
    rng = np.random.default_rng(1)
    ids, mask, positions = _left_padded_prompts(rng, [6, 3, 8], 8)
    steps = 5
    logits, prefix = prefill(model, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
    # Pad tokens are never attended to: other pad ids give the same prefill logits.
    other_pads = np.where(mask, ids, 41)
    logits_other_pads, _ = prefill(model, jnp.asarray(other_pads), jnp.asarray(positions), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(logits_other_pads), np.asarray(logits), atol=1e-6)

    suffix = model.init_suffix_cache(3, 1, steps)
    lengths = mask.sum(1)
    cached, seq, seq_mask = [], ids, mask
    for t in range(steps):
        expected = _uncached_last_logits(model, seq, seq_mask)
        np.testing.assert_allclose(np.asarray(logits).reshape(3, -1), expected, atol=1e-4)
        token = np.asarray(logits).reshape(3, -1).argmax(-1).astype(np.int32)
        assert (token == expected.argmax(-1)).all()
        cached.append(token)
        seq, seq_mask = np.concatenate([seq, token[:, None]], 1), np.concatenate([seq_mask, np.ones((3, 1), bool)], 1)
        pos = jnp.asarray(lengths + t, jnp.int32)[:, None]
        logits, suffix = decode(model, jnp.asarray(token)[:, None], pos, prefix, suffix)
        assert int(suffix.length) == t + 1
    assert np.stack(cached).shape == (steps, 3)


def test_beams_share_the_prefix_and_reorder_like_uncached_runs(model):
    """K=3 continuations per prompt, each checked against an uncached run of prompt + its own history;
    halfway, beams are reordered (as beam search does) by gathering the suffix cache."""
    rng = np.random.default_rng(2)
    ids, mask, positions = _left_padded_prompts(rng, [4, 7], 7)
    num_beams, steps = 3, 4
    _, prefix = prefill(model, jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(mask))
    suffix = model.init_suffix_cache(2, num_beams, steps)
    history = [[[] for _ in range(num_beams)] for _ in range(2)]
    for t in range(steps):
        if t == 2:
            order = np.array([[2, 0, 0], [1, 1, 2]], np.int32)
            suffix = suffix.reorder(jnp.asarray(order))
            history = [[list(history[b][order[b, k]]) for k in range(num_beams)] for b in range(2)]
        tokens = rng.integers(0, CFG.vocab_size, (2, num_beams)).astype(np.int32)
        pos = jnp.asarray(mask.sum(1)[:, None] + t, jnp.int32) * jnp.ones((1, num_beams), jnp.int32)
        logits, suffix = decode(model, jnp.asarray(tokens), pos, prefix, suffix)
        for b in range(2):
            for k in range(num_beams):
                history[b][k].append(int(tokens[b, k]))
                seq = np.concatenate([ids[b], history[b][k]])[None]
                seq_mask = np.concatenate([mask[b], np.ones(t + 1, bool)])[None]
                expected = _uncached_last_logits(model, seq.astype(np.int32), seq_mask)[0]
                np.testing.assert_allclose(np.asarray(logits[b, k]), expected, atol=1e-4)


def test_resize_vocab_keeps_rows_and_initialises_new_tokens():
    tied = eqx.filter_jit(Qwen2.init)(CFG, key=jax.random.key(3))
    ids = jnp.asarray([[1, 5, 90, 3]], jnp.int32)
    pos, seg = jnp.arange(4)[None], jnp.ones((1, 4), jnp.int32)
    base = np.asarray(forward_logits(tied, ids, pos, seg))

    grown = resize_vocab(tied, 110)  # 14 new tokens, 'mean' init
    w = np.asarray(grown.embed.weight)
    assert w.shape == (110, 32) and grown.valid_vocab == 110 and grown.config.vocab_size == 110
    np.testing.assert_array_equal(w[:96], np.asarray(tied.embed.weight))
    np.testing.assert_allclose(w[96:], np.broadcast_to(np.asarray(tied.embed.weight).mean(0), (14, 32)), atol=1e-6)
    np.testing.assert_allclose(np.asarray(forward_logits(grown, ids, pos, seg))[..., :96], base, atol=1e-5)

    # Qwen's case: more rows (96) than real tokens (80). Adding 10 tokens re-initialises ids 80..89, keeps rows
    # 90..95 (spare) and masks every id >= 90.
    qwen_like = resize_vocab(tied, 90, num_existing=80)
    w = np.asarray(qwen_like.embed.weight)
    assert w.shape == (96, 32) and qwen_like.valid_vocab == 90
    np.testing.assert_array_equal(w[:80], np.asarray(tied.embed.weight)[:80])
    np.testing.assert_array_equal(w[90:], np.asarray(tied.embed.weight)[90:])
    np.testing.assert_allclose(
        w[80:90], np.broadcast_to(np.asarray(tied.embed.weight)[:80].mean(0), (10, 32)), atol=1e-6
    )
    logits = np.asarray(forward_logits(qwen_like, ids, pos, seg))
    assert np.isneginf(logits[..., 90:]).all() and np.isfinite(logits[..., :90]).all()

    with pytest.raises(ValueError, match="num_existing"):
        resize_vocab(tied, 50, num_existing=60)


def test_resize_vocab_normal_init_and_untied_head():
    cfg = dataclasses.replace(CFG, tie_word_embeddings=False, new_token_init="normal", init_std=0.05)
    untied = eqx.filter_jit(Qwen2.init)(cfg, key=jax.random.key(4))
    grown = resize_vocab(untied, 96 + 200, key=jax.random.key(5))
    for new, old in [(grown.embed.weight, untied.embed.weight), (grown.lm_head.weight, untied.lm_head.weight)]:
        new = np.asarray(new)
        np.testing.assert_array_equal(new[:96], np.asarray(old))
        assert new[96:].std() == pytest.approx(0.05, rel=0.1) and abs(new[96:].mean()) < 0.01
    assert not np.allclose(np.asarray(grown.embed.weight)[96:], np.asarray(grown.lm_head.weight)[96:])


@pytest.mark.parametrize("tied", [True, False])
def test_pad_and_unpad_vocab(tied):
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    model = resize_vocab(eqx.filter_jit(Qwen2.init)(cfg, key=jax.random.key(6)), 90, num_existing=90)
    padded = pad_vocab(model, 64)
    assert padded.embed.weight.shape[0] == 128 and padded.valid_vocab == 90 and padded.config.vocab_size == 128
    if not tied:
        assert padded.lm_head.weight.shape[0] == 128
    ids, pos, seg = jnp.asarray([[3, 8, 1]], jnp.int32), jnp.arange(3)[None], jnp.ones((1, 3), jnp.int32)
    a, b = np.asarray(forward_logits(model, ids, pos, seg)), np.asarray(forward_logits(padded, ids, pos, seg))
    np.testing.assert_allclose(b[..., :90], a[..., :90], atol=1e-6)
    assert np.isneginf(b[..., 90:]).all()
    assert pad_vocab(padded, 64).embed.weight.shape[0] == 128  # already a multiple

    unpadded = unpad_vocab(padded)
    assert unpadded.embed.weight.shape[0] == 90 and unpadded.config.vocab_size == 90
    np.testing.assert_array_equal(np.asarray(unpadded.embed.weight), np.asarray(model.embed.weight)[:90])
    if not tied:
        np.testing.assert_array_equal(np.asarray(unpadded.lm_head.weight), np.asarray(model.lm_head.weight)[:90])
    repadded = pad_vocab(unpadded, 48)  # another mesh's multiple
    assert repadded.embed.weight.shape[0] == 96
    with pytest.raises(ValueError, match="multiple"):
        pad_vocab(model, 0)


def test_remat_policies_give_the_same_gradients(model):
    ids = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 6)), jnp.int32)
    pos, seg = jnp.broadcast_to(jnp.arange(6), (2, 6)), jnp.ones((2, 6), jnp.int32)

    @eqx.filter_jit
    @eqx.filter_grad
    def grad(m):
        logp = jax.nn.log_softmax(m.logits(m(ids, pos, seg)))
        return -jnp.mean(jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1))

    grads = {}
    for remat in ("none", "full", "dots"):
        m = dataclasses.replace(model, config=dataclasses.replace(model.config, remat=remat))
        grads[remat] = jax.tree.leaves(grad(m))
    for remat in ("full", "dots"):
        for g, ref in zip(grads[remat], grads["none"], strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(ref), atol=1e-6)
    with pytest.raises(ValueError, match="remat"):
        bad = dataclasses.replace(model, config=dataclasses.replace(model.config, remat="some"))
        bad(ids, pos, seg)


def test_bf16_compute_with_f32_params(model):
    bf16 = dataclasses.replace(model, config=dataclasses.replace(model.config, compute_dtype="bfloat16"))
    ids = jnp.asarray([[4, 9, 2, 60, 11]], jnp.int32)
    pos, seg = jnp.arange(5)[None], jnp.ones((1, 5), jnp.int32)
    hidden = eqx.filter_jit(lambda m: m(ids, pos, seg))(bf16)
    assert hidden.dtype == jnp.bfloat16
    logits = np.asarray(bf16.logits(hidden))
    assert logits.dtype == np.float32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16))
    np.testing.assert_allclose(logits, np.asarray(forward_logits(model, ids, pos, seg)), atol=0.15, rtol=0.05)
    # Optimizer routing contract: hidden matrices are exactly the 3-D leaves under `layers`.
    ndims = {jax.tree_util.keystr(p): x.ndim for p, x in jax.tree_util.tree_leaves_with_path(model.layers)}
    assert {k for k, n in ndims.items() if n == 3} == {
        f".attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")
    } | {f".mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}


def test_bad_configs():
    build = lambda cfg: eqx.filter_eval_shape(Qwen2.init, cfg, key=jax.random.key(0))  # noqa: E731
    with pytest.raises(ValueError, match="vocab_size"):
        build(dataclasses.replace(CFG, vocab_size=0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        build(dataclasses.replace(CFG, num_kv_heads=3))
    for bad in (0, -2, "all", True):
        with pytest.raises(ValueError, match="model.scan_unroll must be a positive integer"):
            build(dataclasses.replace(CFG, scan_unroll=bad))
    if jax.default_backend() != "gpu":
        m = build(dataclasses.replace(CFG, attention="cudnn"))
        x = jnp.zeros((1, 2), jnp.int32)
        with pytest.raises(ValueError, match="cudnn"):
            eqx.filter_eval_shape(lambda m: m(x, x, x + 1), m)


def test_unrolled_layer_scan_equals_rolled(model):
    ids = jnp.asarray(np.random.default_rng(4).integers(0, CFG.vocab_size, (2, 7)), jnp.int32)
    pos, seg = jnp.broadcast_to(jnp.arange(7), (2, 7)), jnp.ones((2, 7), jnp.int32)
    unrolled = dataclasses.replace(model, config=dataclasses.replace(model.config, scan_unroll=CFG.num_layers))
    np.testing.assert_allclose(
        np.asarray(forward_logits(unrolled, ids, pos, seg)), np.asarray(forward_logits(model, ids, pos, seg)), atol=1e-5
    )


@pytest.mark.parametrize("tied", [True, False])
def test_train_flops_count_the_head_per_supervised_token(tied):
    from sid.models.flops import train_flops

    cfg = tiny_qwen2(
        hidden_size=16, intermediate_size=24, vocab_size=40, tie_word_embeddings=tied, compute_dtype="bfloat16",
        remat="full",
    )  # fmt: skip
    model = Qwen2.init(cfg, key=jax.random.key(0))
    # Per layer, by hand: q 16x16 + 16, k and v 16x8 + 8 (2 KV heads of 4), o 16x16, gate/up/down 16x24, 2 norms of 16.
    per_layer = (256 + 16) + 2 * (128 + 8) + 256 + 3 * 384 + 2 * 16
    layers = 2 * per_layer + 16  # + the final norm
    flops = train_flops(model, seq_len=10)
    assert flops.per_target == 6 * 40 * 16  # the head: the embedding when tied, lm_head otherwise
    assert flops.per_token == 6 * layers + 12 * 2 * 4 * 4 * 10  # + attention: layers x heads x head_dim x seq
    assert flops(100, 30) == 100 * flops.per_token + 30 * flops.per_target


# --- dropout -----------------------------------------------------------------------------------------------------

DROP = dataclasses.replace(CFG, attention_dropout=0.25, residual_dropout=0.25)


def with_config(m: Qwen2, **changes) -> Qwen2:
    """The same weights under other (non-architecture) config fields."""
    return dataclasses.replace(m, config=dataclasses.replace(m.config, **changes))


def _train_forward(m, ids, positions, segments, key):
    return m(ids, positions, segments, key=key)


def test_dropout_acts_only_with_a_key_and_is_a_function_of_the_key(model):
    dropped = with_config(model, attention_dropout=0.25, residual_dropout=0.25)  # same weights
    ids = jnp.asarray(np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 12)), jnp.int32)
    pos, seg = jnp.broadcast_to(jnp.arange(12), (2, 12)), jnp.ones((2, 12), jnp.int32)
    fwd = eqx.filter_jit(_train_forward)
    plain = np.asarray(fwd(model, ids, pos, seg, None))
    np.testing.assert_array_equal(np.asarray(fwd(dropped, ids, pos, seg, None)), plain)  # eval: no dropout
    np.testing.assert_array_equal(np.asarray(fwd(model, ids, pos, seg, jax.random.key(1))), plain)  # rates 0
    a, b = (np.asarray(fwd(dropped, ids, pos, seg, jax.random.key(k))) for k in (1, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain, atol=1e-2)
    assert not np.allclose(a, np.asarray(fwd(dropped, ids, pos, seg, jax.random.key(2))), atol=1e-2)
    with pytest.raises(ValueError, match="model.residual_dropout"):
        Qwen2.init(dataclasses.replace(CFG, residual_dropout=1.0), key=jax.random.key(0))


def test_residual_dropout_zeroes_the_expected_fraction_and_rescales_the_rest(model):
    """A layer whose MLP outputs 0: out - x is the attention branch, dropped at rate p (and scaled by 1/(1-p))."""
    from sid.models.layers import rope_cos_sin
    from sid.models.qwen2 import dot_product_attention

    layer = jax.tree.map(lambda a: a[0], model.layers)
    layer = eqx.tree_at(lambda m: m.mlp.down_proj.weight, layer, jnp.zeros_like(layer.mlp.down_proj.weight))
    x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 32, CFG.hidden_size)), jnp.float32)
    order = jnp.broadcast_to(jnp.arange(32), (4, 32))
    cos, sin = rope_cos_sin(order, model.config.head_dim, CFG.rope_theta)
    mask = attention_mask(jnp.ones_like(order), order, jnp.ones_like(order), order)

    def attend(q, k, v):
        return dot_product_attention(q, k, v, mask, "xla"), None

    p = 0.3
    branch = np.asarray(layer(x, cos, sin, attend)[0] - x)
    dropped = np.asarray(layer(x, cos, sin, attend, residual_dropout=p, key=jax.random.key(5))[0] - x)
    zero = dropped == 0
    assert not (branch == 0).any()
    assert abs(zero.mean() - p) < 0.02  # 16,384 draws: 5 standard deviations
    np.testing.assert_allclose(dropped[~zero], branch[~zero] / (1 - p), rtol=1e-4, atol=1e-5)


def test_attention_dropout_drops_probabilities_at_the_rate_and_rescales_the_rest():
    """Values are one-hot per key position, so each output row is its query's (dropped) attention probabilities."""
    from sid.models.qwen2 import dropout_attention

    b, t, heads, kv_heads, p = 4, 32, 4, 2, 0.3
    r = np.random.default_rng(6)
    q, k = r.normal(size=(b, t, heads, t)), r.normal(size=(b, t, kv_heads, t))
    v = np.broadcast_to(np.eye(t)[None, :, None, :], (b, t, kv_heads, t))
    order = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = attention_mask(jnp.ones_like(order), order, jnp.ones_like(order), order)
    out = np.asarray(dropout_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), mask, p, jax.random.key(7)))
    kh = np.repeat(k, heads // kv_heads, axis=2)  # query head h uses kv head h // 2
    scores = np.einsum("bthd,bshd->bhts", q, kh) / np.sqrt(t)
    causal = np.tril(np.ones((t, t), bool))
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True)).transpose(0, 2, 1, 3)  # [b, t, heads, s]
    visible = np.broadcast_to(causal[None, :, None, :], out.shape)
    assert not out[~visible].any()
    kept = visible & (out != 0)
    assert abs(1 - kept.sum() / visible.sum() - p) < 0.025  # 8,448 visible probabilities: 5 standard deviations
    np.testing.assert_allclose(out[kept], probs[kept] / (1 - p), rtol=1e-4, atol=1e-6)


def test_dropout_under_remat_recomputes_the_same_masks():
    """Full remat reruns each layer's forward in the backward pass: the same per-layer keys, so the same masks and
    the same gradients as without remat."""
    m = Qwen2.init(DROP, key=jax.random.key(0))
    ids = jnp.asarray(np.random.default_rng(8).integers(0, CFG.vocab_size, (2, 10)), jnp.int32)
    pos, seg = jnp.broadcast_to(jnp.arange(10), (2, 10)), jnp.ones((2, 10), jnp.int32)

    def loss(m):
        return jnp.sum(m.logits(m(ids, pos, seg, key=jax.random.key(3)))[..., :5] ** 2)

    grads = [eqx.filter_jit(eqx.filter_grad(loss))(with_config(m, remat=r)) for r in ("none", "full")]
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        # Float order differs between the two programs; another mask would move gradients by their own size.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))
