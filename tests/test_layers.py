"""Linear's hand-written VJP: autodiff's gradients, except that the float32 weight and bias get theirs unrounded."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sid.models.layers import Linear, _affine, scan_layers


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
