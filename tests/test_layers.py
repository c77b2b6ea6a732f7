"""The layers' hand-written VJPs: Linear's weight and bias gradients come out unrounded in float32, and a lookup in a
vocab table split over devices sends bfloat16 but scatters its gradient in float32. Log-probabilities over a vocab
table split over devices equal an exact log-softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from sid.config import MeshConfig
from sid.models.layers import Embedding, Linear, _affine, scan_layers, vocab_logprobs
from sid.parallel.mesh import batch_sharding, make_mesh
from sid.parallel.trace import table_split, traced_on


def linear_and_cotangent(dtype, *, bias: bool, seed: int = 0):
    kw, kx, ky = jax.random.split(jax.random.key(seed), 3)
    layer = Linear.init(48, 24, bias=bias, std=0.5, key=kw)
    if bias:
        layer = Linear(layer.weight, jnp.linspace(-1.0, 1.0, 24, dtype=jnp.float32))
    x = jax.random.normal(kx, (3, 40, 48), jnp.float32).astype(dtype)
    dy = jax.random.normal(ky, (3, 40, 24), jnp.float32).astype(dtype)
    return layer, x, dy


def vjp(fn, layer: Linear, x, dy):
    """(dx, dweight, dbias) of `fn(x, weight, bias)` at cotangent dy."""
    y, pullback = jax.vjp(fn, x, layer.weight, layer.bias)
    return y, pullback(dy)


@pytest.mark.parametrize("bias", [True, False])
def test_float32_gradients_equal_autodiff(bias):
    layer, x, dy = linear_and_cotangent(jnp.float32, bias=bias)
    y, got = vjp(lambda x, w, b: Linear(w, b)(x), layer, x, dy)
    y_ref, want = vjp(_affine, layer, x, dy)
    np.testing.assert_array_equal(y, y_ref)
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            assert g.dtype == w.dtype
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)


def test_bfloat16_weight_and_bias_gradients_are_not_rounded_to_bfloat16():
    layer, x, dy = linear_and_cotangent(jnp.bfloat16, bias=True)
    _, (dx, dweight, dbias) = vjp(lambda x, w, b: Linear(w, b)(x), layer, x, dy)
    # Oracle: the exact sums (float64) of the bfloat16 operands.
    x64, dy64 = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    want_w = np.einsum("bto,bti->oi", dy64, x64)
    want_b = dy64.sum(axis=(0, 1))
    assert dweight.dtype == dbias.dtype == jnp.float32
    scale = np.abs(want_w).max()
    assert np.abs(np.asarray(dweight) - want_w).max() < 1e-6 * scale
    np.testing.assert_allclose(dbias, want_b, rtol=1e-5, atol=1e-5)
    # What the custom VJP avoids: autodiff rounds the matmul's output to bfloat16 first (~3 significant digits).
    _, (dx_ref, rounded, _) = vjp(_affine, layer, x, dy)
    assert np.abs(np.asarray(rounded) - want_w).max() > 1e-4 * scale
    # The input's gradient is autodiff's (bfloat16, as the activations).
    assert dx.dtype == jnp.bfloat16
    np.testing.assert_array_equal(dx, dx_ref)


def test_remat_dots_recomputes_no_linear_matmul():
    # Remat 'dots' keeps the weight matmuls' outputs, so the backward pass recomputes none of them: the grad has as
    # many matmuls as without remat (fwd 2, bwd 4). Calling the custom_vjp function inside its own forward rule
    # hid the matmuls from the policy and recomputed them all.
    layers = jax.vmap(lambda k: Linear.init(16, 16, bias=True, std=0.3, key=k))(jax.random.split(jax.random.key(0), 3))
    x = jnp.ones((4, 16), jnp.bfloat16)

    def loss(layers, remat):
        def body(layer, h, _):
            return layer(jnp.tanh(layer(h))), None

        return scan_layers(body, x, layers, remat=remat)[0].astype(jnp.float32).sum()

    def matmuls(remat):
        hlo = jax.jit(jax.grad(loss), static_argnums=1).lower(layers, remat).compile().as_text()
        return hlo.count(" dot(")

    assert matmuls("dots") == matmuls("none") == 6
    # The control: full remat recomputes the matmul whose output the backward needs (tanh's input).
    assert matmuls("full") == 7


def test_lookup_in_a_split_table_equals_one_device_and_accumulates_in_float32():
    # Rows of a table split over 8 devices, looked up in bfloat16 by ids that repeat token 3 many times: the
    # gradient of row 3 sums 200 bfloat16 rows, which a bfloat16 scatter would round at every add.
    emb = Embedding.init(64, 16, std=1.0, key=jax.random.key(0))
    r = np.random.default_rng(0)
    ids = np.where(r.random((8, 32)) < 0.8, 3, r.integers(0, 64, (8, 32))).astype(np.int32)
    weights = jax.random.normal(jax.random.key(1), (8, 32, 16), jnp.float32)

    def loss(emb, ids, weights):
        rows = emb(ids, jnp.bfloat16)
        assert rows.dtype == jnp.bfloat16
        return (rows.astype(jnp.float32) * weights).sum(), rows

    (_, rows_single), grad_single = jax.value_and_grad(loss, has_aux=True)(emb, ids, weights)
    mesh = make_mesh(MeshConfig(fsdp=8))
    split = jax.tree.map(lambda _: NamedSharding(mesh, PartitionSpec("fsdp", None)), emb)
    sharded = jax.jit(
        traced_on(mesh, jax.value_and_grad(loss, has_aux=True)),
        in_shardings=(split, batch_sharding(mesh), batch_sharding(mesh)),
    )
    (_, rows), grad = sharded(jax.device_put(emb, split), ids, weights)
    np.testing.assert_array_equal(rows, rows_single)
    assert grad.weight.dtype == jnp.float32
    want = np.zeros((64, 16))  # each row's gradient is its weights in bfloat16 (the rows' dtype), summed exactly
    np.add.at(want, ids.reshape(-1), np.asarray(weights.astype(jnp.bfloat16), np.float64).reshape(-1, 16))
    np.testing.assert_allclose(grad.weight, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad.weight, grad_single.weight, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("mesh_cfg", "rows", "split_rows"),
    [
        (MeshConfig(fsdp=8), 48, ("fsdp",)),  # 6 rows per device; ids >= 40 are invalid: the last device has none
        (MeshConfig(dp=2, fsdp=2, tp=2), 48, ("tp", "fsdp")),
        (MeshConfig(fsdp=4, tp=2), 52, ("tp",)),  # 8 does not divide 52: tp splits the rows, fsdp only the batch
        (MeshConfig(fsdp=8), 44, None),  # no axis divides the rows: every device holds all of them
    ],
    ids=["fsdp8", "dp2_fsdp2_tp2", "tp_rows_only", "rows_whole"],
)
def test_vocab_logprobs_over_a_split_table_equal_an_exact_log_softmax(mesh_cfg, rows, split_rows):
    valid = 40
    kh, kt = jax.random.split(jax.random.key(0))
    hidden = jax.random.normal(kh, (8, 3, 16), jnp.float32)
    table = jax.random.normal(kt, (rows, 16), jnp.float32)
    tokens = jnp.asarray([0, 5, 6, 11, 12, 23, 24, 39, 40, rows - 1], jnp.int32)  # shard edges, and invalid ids
    logits = np.einsum("btd,vd->btv", np.asarray(hidden, np.float64), np.asarray(table, np.float64))[..., :valid]
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.where(np.asarray(tokens) < valid, logits[..., np.minimum(np.asarray(tokens), valid - 1)], -np.inf)
    want = picked - lse[..., None]

    def fn(hidden, table, tokens):
        return vocab_logprobs(hidden, table, tokens, valid_vocab=valid)

    np.testing.assert_allclose(jax.jit(fn)(hidden, table, tokens), want, rtol=0, atol=1e-5)
    mesh = make_mesh(mesh_cfg)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        split = table_split(rows)
    assert (split and split.rows) == split_rows
    got = jax.jit(traced_on(mesh, fn), in_shardings=(batch_sharding(mesh), None, None))(hidden, table, tokens)
    assert len(got.sharding.device_set) == 8
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dropout_keeps_the_dtype_and_the_mean_and_is_off_without_a_key(dtype):
    from sid.models.layers import dropout

    x = jnp.full((256, 256), 1.5, dtype)
    assert dropout(x, 0.4, None) is x and dropout(x, 0.0, jax.random.key(0)) is x
    y = np.asarray(dropout(x, 0.4, jax.random.key(0)).astype(jnp.float32))
    assert dropout(x, 0.4, jax.random.key(0)).dtype == dtype
    assert set(np.unique(y).tolist()) == {0.0, 2.5}  # 1.5 / 0.6 (bfloat16 rounds to the same)
    assert abs((y == 0).mean() - 0.4) < 0.005  # 65,536 draws: 5 standard deviations
    np.testing.assert_allclose(y.mean(), 1.5, rtol=0.02)
