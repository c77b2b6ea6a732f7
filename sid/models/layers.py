"""Building blocks shared by the model families: Linear, Embedding, RMSNorm, LayerNorm, RoPE, and running a
stack of layers with `jax.lax.scan` under a remat policy.

Numerics convention: parameters are stored in float32; a layer computes in the dtype of its input (the model's
compute dtype, cast once at the embedding), while norms and RoPE compute in float32 and cast back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int, PRNGKeyArray

from sid.parallel.trace import constrain_table, param_split, table_split

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
"""Config dtype names to JAX dtypes."""


class Linear(eqx.Module):
    """`x @ weight.T + bias` with `weight` stored (out, in) like torch and `eqx.nn.Linear`."""

    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] | None

    @staticmethod
    def init(in_features: int, out_features: int, *, bias: bool, std: float, key: PRNGKeyArray) -> Linear:
        """Weight ~ N(0, std), bias zero (the GPT-2/Qwen2 init)."""
        weight = std * jax.random.normal(key, (out_features, in_features), jnp.float32)
        return Linear(weight, jnp.zeros((out_features,), jnp.float32) if bias else None)

    def __call__(self, x: Float[Array, "... in"]) -> Float[Array, "... out"]:
        """Apply in the input's dtype (weights are cast, not the activations)."""
        return _linear(x, self.weight, self.bias)


def _affine(x: Array, weight: Array, bias: Array | None) -> Array:
    y = x @ weight.astype(x.dtype).T
    return y if bias is None else y + bias.astype(x.dtype)


_linear = jax.custom_vjp(_affine)


def _linear_fwd(x: Array, weight: Array, bias: Array | None) -> tuple[Array, tuple]:
    # Plain ops, not `_linear` itself: a custom_vjp call here would hide the matmul from the remat policy, which
    # would then recompute it in the backward pass.
    return _affine(x, weight, bias), (x, weight, bias)


def _linear_bwd(res: tuple, dy: Array) -> tuple[Array, Array, Array | None]:
    """Autodiff's gradients, except that the weight's and bias's come out of their matmul / sum in float32 (they
    are float32 params): left to autodiff they would be rounded to the compute dtype first. Under FSDP each device
    holds a partial sum of them over its rows, and the partitioner reduces them across devices in the dtype they
    come out in; this keeps that reduction (and the micro-batch accumulation) in float32."""
    x, weight, bias = res
    dx = dy @ weight.astype(dy.dtype)
    rows = "".join(chr(ord("a") + i) for i in range(dy.ndim - 1))
    dweight = jnp.einsum(f"{rows}o,{rows}i->oi", dy, x, preferred_element_type=jnp.float32)
    dbias = None if bias is None else jnp.sum(dy, axis=tuple(range(dy.ndim - 1)), dtype=jnp.float32)
    return dx, dweight.astype(weight.dtype), None if bias is None else dbias.astype(bias.dtype)


_linear.defvjp(_linear_fwd, _linear_bwd)


def dropout(x: Array, rate: float, key: PRNGKeyArray | None) -> Array:
    """Inverted dropout in `x`'s dtype: each element is zeroed with probability `rate` and the rest are scaled by
    1 / (1 - rate), so the expectation is unchanged. The identity without a key (eval) or at rate 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


class Embedding(eqx.Module):
    """A lookup table `weight[V, D]`."""

    weight: Float[Array, "vocab embed"]

    @staticmethod
    def init(num_embeddings: int, dim: int, *, std: float, key: PRNGKeyArray) -> Embedding:
        """Rows ~ N(0, std)."""
        return Embedding(std * jax.random.normal(key, (num_embeddings, dim), jnp.float32))

    def __call__(self, ids: Int[Array, "..."], dtype: Any) -> Float[Array, "... embed"]:
        """Rows for `ids`, cast to `dtype` (the model's compute dtype)."""
        table = constrain_table(self.weight)
        if param_split() == 1:
            return jnp.take(table, ids, axis=0).astype(dtype)
        return _split_table_lookup(table, ids, dtype)


def _cast_lookup(table: Array, ids: Array, dtype: Any) -> Array:
    return jnp.take(table.astype(dtype), ids, axis=0)


_split_table_lookup = jax.custom_vjp(_cast_lookup, nondiff_argnums=(2,))
"""`table[ids]` in `dtype`, for a table split over devices: the partitioner looks up each device's rows and sums the
partial results across devices, which is exact in the compute dtype (one device holds each row), so the table is
cast first and that sum sends half the bytes of a float32 one. The gradient is scattered into the float32 table in
float32 (a token's rows add up over the batch), after its rows are gathered in `dtype`."""


def _split_table_lookup_fwd(table: Array, ids: Array, dtype: Any) -> tuple[Array, tuple[Array, Array]]:
    return _cast_lookup(table, ids, dtype), (table, ids)


def _split_table_lookup_bwd(dtype: Any, res: tuple[Array, Array], d_rows: Array) -> tuple[Array, None]:
    table, ids = res
    # Every device scatters all the rows' gradients into its own rows of the table.
    d_rows, ids = jax.lax.with_sharding_constraint((d_rows, ids), PartitionSpec())
    d_table = jnp.zeros(table.shape, jnp.float32).at[ids].add(d_rows.astype(jnp.float32))
    return d_table.astype(table.dtype), None


_split_table_lookup.defvjp(_split_table_lookup_fwd, _split_table_lookup_bwd)


def vocab_logprobs(
    hidden: Float[Array, "batch *rest embed"],
    table: Float[Array, "vocab embed"],
    tokens: Int[Array, " n"],
    *,
    valid_vocab: int,
) -> Float[Array, "batch *rest n"]:
    """`log_softmax(hidden @ table.T)` over the ids < `valid_vocab`, in float32, read at `tokens` only.

    Under a mesh that splits the table's rows (`table_split`), each device computes the logits of its own
    rows only, for the batch rows of every device it shares them with (hidden states gathered over fsdp: a few MB
    when decoding), and the devices combine their partial logsumexps and picked logits (a few floats per
    row). Batch-split logits instead made the partitioner gather the whole table onto every device on every call:
    467 MB per decoding step at Qwen2.5-1.5B's vocab, a third of beam search's traffic on fsdp8."""
    split = table_split(table.shape[0])
    if split is None:
        lse, picked = _rows_logsumexp_and_pick(hidden, table, tokens, valid_vocab, 0)
        return picked - lse[..., None]
    gather = "fsdp" in split.rows and "fsdp" in split.batch  # the devices sharing my table rows hold other rows

    def local(h: Array, rows: Array, tokens: Array) -> Array:
        if gather:
            h = jax.lax.all_gather(h, "fsdp", axis=0, tiled=True)
        shard = 0
        for axis in split.rows:  # this device's block of rows, counting major axis first as the spec splits them
            shard = shard * split.mesh.shape[axis] + jax.lax.axis_index(axis)
        lse, picked = _rows_logsumexp_and_pick(h, rows, tokens, valid_vocab, shard * rows.shape[0])
        top = jax.lax.pmax(lse, split.rows)  # finite: some device holds valid ids
        lse = top + jnp.log(jax.lax.psum(jnp.exp(lse - top), split.rows))
        out = jax.lax.psum(picked, split.rows) - lse[..., None]
        if gather:  # back to this device's own batch rows
            n = out.shape[0] // split.mesh.shape["fsdp"]
            out = jax.lax.dynamic_slice_in_dim(out, jax.lax.axis_index("fsdp") * n, n, axis=0)
        return out

    return jax.shard_map(
        local,
        mesh=split.mesh,
        in_specs=(PartitionSpec(split.batch), PartitionSpec(split.rows, None), PartitionSpec()),
        out_specs=PartitionSpec(split.batch),
    )(hidden, table, tokens)


def _rows_logsumexp_and_pick(
    hidden: Array, rows: Array, tokens: Array, valid_vocab: int, first_id: Array | int
) -> tuple[Array, Array]:
    """Over the table rows `rows` (ids first_id, first_id + 1, ...): each hidden row's logsumexp of the valid ids'
    logits (-inf if there are none), and its logits at `tokens` (0 at tokens not among these rows)."""
    logits = jnp.einsum("...d,vd->...v", hidden, rows.astype(hidden.dtype), preferred_element_type=jnp.float32)
    ids = first_id + jnp.arange(rows.shape[0])
    logits = jnp.where(ids < valid_vocab, logits, -jnp.inf)
    local = tokens - first_id
    here = (local >= 0) & (local < rows.shape[0])
    picked = jnp.where(here, jnp.take(logits, jnp.clip(local, 0, rows.shape[0] - 1), axis=-1), 0.0)
    return jax.nn.logsumexp(logits, axis=-1), picked


class RMSNorm(eqx.Module):
    """Root-mean-square norm with a learned scale, computed in float32."""

    weight: Float[Array, " dim"]
    eps: float = eqx.field(static=True)

    @staticmethod
    def init(dim: int, eps: float) -> RMSNorm:
        """Unit scale."""
        return RMSNorm(jnp.ones((dim,), jnp.float32), eps)

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        """Normalise over the last axis; the result has the input's dtype."""
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (self.weight * y).astype(x.dtype)


class LayerNorm(eqx.Module):
    """LayerNorm with a learned scale and an optional bias (nanoGPT's `bias=False`), computed in float32."""

    weight: Float[Array, " dim"]
    bias: Float[Array, " dim"] | None
    eps: float = eqx.field(static=True)

    @staticmethod
    def init(dim: int, *, bias: bool, eps: float = 1e-5) -> LayerNorm:
        """Unit scale, zero bias."""
        return LayerNorm(jnp.ones((dim,), jnp.float32), jnp.zeros((dim,), jnp.float32) if bias else None, eps)

    def __call__(self, x: Float[Array, "... dim"]) -> Float[Array, "... dim"]:
        """Normalise over the last axis; the result has the input's dtype."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.astype(x.dtype)


def rope_cos_sin(
    positions: Int[Array, "*batch seq"], head_dim: int, theta: float
) -> tuple[Float[Array, "*batch seq half"], Float[Array, "*batch seq half"]]:
    """cos/sin of the rotary angles `position * theta^(-2i/head_dim)` in float32, one pair per position."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(
    x: Float[Array, "*batch seq heads head_dim"],
    cos: Float[Array, "*batch seq half"],
    sin: Float[Array, "*batch seq half"],
) -> Float[Array, "*batch seq heads head_dim"]:
    """Rotate the two halves of each head (the HF/Qwen "rotate_half" layout, not interleaved pairs)."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    cos, sin = cos[..., None, :], sin[..., None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


Remat = Literal["none", "full", "dots"]


FUSED_ATTENTION_FORWARD = frozenset({"dot_product_attention_fwd_wrapper", "dot_product_attention_fwd"})
"""jax's cuDNN attention forward primitives: their outputs are the attention output and its softmax statistics
(one f32 per query and head), which is all the cuDNN backward needs besides q, k and v."""


def _save_dots_and_fused_attention(prim, *args, **params) -> bool:
    """Remat policy 'dots': weight matmul outputs and cuDNN attention's forward outputs are saved."""
    return prim.name in FUSED_ATTENTION_FORWARD or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(
        prim, *args, **params
    )


def check_scan_unroll(unroll: int) -> None:
    """Refuse a `scan_unroll` (layers per scan iteration) that is not a positive integer, naming the field."""
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"model.scan_unroll must be a positive integer, got {unroll!r}")


def scan_layers(
    fn: Callable[[Any, Any, Any], tuple[Any, Any]],
    carry: Any,
    layers: eqx.Module,
    xs: Any = None,
    *,
    remat: Remat,
    unroll: int = 1,
) -> tuple[Any, Any]:
    """Run `fn(layer, carry, x) -> (carry, y)` over a stacked layer module (every array leaf has a leading
    [num_layers] axis) and per-layer inputs `xs`, with one traced layer so compile time does not grow with depth.

    remat: 'none' keeps every activation for the backward pass; 'full' keeps only each layer's input and
    recomputes the rest; 'dots' keeps the weight matmul outputs, and the output and softmax statistics of cuDNN
    fused attention (so its backward does not rerun its forward), and recomputes the cheap elementwise ops and
    XLA attention's scores (which scale with sequence length squared).

    unroll: layers per loop iteration (`jax.lax.scan(unroll=...)`). 1 keeps compile time flat in depth; a small
    model is faster fully unrolled (no per-iteration loop overhead or carry copies), at a compile-time cost.
    """
    params, static = eqx.partition(layers, eqx.is_array)

    def step(carry, inputs):
        layer_params, x = inputs
        return fn(eqx.combine(layer_params, static), carry, x)

    if remat == "full":
        step = jax.checkpoint(step, prevent_cse=False)
    elif remat == "dots":
        step = jax.checkpoint(step, prevent_cse=False, policy=_save_dots_and_fused_attention)
    elif remat != "none":
        raise ValueError(f"unknown remat policy {remat!r}: expected 'none', 'full' or 'dots'")
    return jax.lax.scan(step, carry, (params, xs), unroll=unroll)
