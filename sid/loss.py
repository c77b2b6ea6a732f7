"""Next-token cross-entropy in f32 without materialising f32 logits for every token × the whole vocab.

Tokens are processed in chunks, so only one chunk's logits exist at a time. Under differentiation the gradients
are formed in the same pass as the loss (a custom VJP whose forward already computes d(loss)/d(hidden) and
d(loss)/d(head); its backward only scales them by the incoming cotangent): each chunk's logits are computed once,
not once in the forward and again in the backward, which saves one [tokens, vocab, hidden] matmul, a quarter of the
head's FLOPs. d(loss)/d(logits) = softmax - onehot is formed in f32 and cast to the compute dtype before the two
gradient matmuls (f32 operands there would make them the slowest matmuls of a training step). Without
differentiation (held-out loss) only the loss is computed.

Only tokens with a target need the head at all, and in SFT those are the completions, a sixth of the tokens. Each
device's tokens are reordered supervised-first, and chunks past the last supervised token are skipped by a branch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sid.parallel.trace import batch_split, replicas_max

IGNORE = -100
CHUNK_ELEMENTS = 1 << 30
"""Logits elements per chunk (4 GiB in f32 on one device; split over the devices that share the tokens). Fewer,
larger chunks mean fewer passes over the f32 d(head) accumulator (each chunk reads and writes all of it) and a
d(head) matmul that contracts over more tokens per pass: 4,096 tokens per chunk at Qwen's vocab."""


def chunk_size(num_tokens: int, vocab: int) -> int:
    """Tokens per chunk: as many as fit the element budget, dividing num_tokens exactly."""
    target = max(1, min(num_tokens, CHUNK_ELEMENTS // max(vocab, 1)))
    while num_tokens % target:
        target -= 1
    return target


def cross_entropy_sum(
    hidden: Float[Array, "rows ... d"],
    head: Float[Array, "v d"],
    targets: Int[Array, "rows ..."],
    *,
    valid_vocab: int,
    compute_dtype=jnp.bfloat16,
) -> tuple[Float[Array, ""], Int[Array, ""]]:
    """Sum of -log p(target) over tokens with target >= 0, and the number of such tokens.

    Logits are `hidden @ head.T` in `compute_dtype` with f32 accumulation; ids >= valid_vocab are excluded
    from the softmax (padded vocab rows can never be predicted). Gradients flow to `hidden` and `head`
    (d(head) accumulated in f32 over the chunks).

    Only chunks that hold a supervised token are computed. Each group of rows that one device holds (`batch_split`)
    puts its supervised tokens first (a stable sort: a permutation of the hidden states, undone in the backward
    pass), and the chunk loop skips the chunks past the last one any group needs. In SFT only the completions
    are supervised (17% of the seed recipe's tokens), so most of the head's matmuls and the softmax passes over
    prompt tokens are skipped. Skipped tokens contribute exactly zero to the loss and the gradients anyway.
    """
    d, v = hidden.shape[-1], head.shape[0]
    groups = batch_split()
    if hidden.shape[0] % groups:  # rows not split evenly over the devices (never in the trainer): one group
        groups = 1
    h = hidden.reshape(groups, -1, d)
    t = targets.reshape(groups, -1)
    per_group = h.shape[1]
    m = chunk_size(per_group, v * groups)  # tokens per group in a chunk: the element budget holds for all groups
    num_chunks = per_group // m

    order = jnp.argsort(t < 0, axis=1, stable=True)
    h = _permute(h, order)
    t = jnp.take_along_axis(t, order, axis=1, mode="promise_in_bounds")
    # Chunks to compute: the same on every device (a max over all groups, the trainer's replicas included), so the
    # chunk loop's branch stays a branch, not a select of both sides.
    needed = replicas_max((jnp.max((t >= 0).sum(1)) + m - 1) // m)

    def chunks_of(x):
        # Chunk k holds tokens [k*m, (k+1)*m) of every group: each chunk's matmuls stay split over the devices by
        # group. (Contiguous chunks of the flat tokens would each lie on one or two devices, and the partitioner
        # gathered every device's hidden states onto every device to slice out each chunk: 1.5B on fsdp8, 26 GB
        # per device per step.)
        x = x.reshape(groups, num_chunks, m, *x.shape[2:]).swapaxes(0, 1)
        return x.reshape(num_chunks, groups * m, *x.shape[3:])

    # (Defined here so they close over Python constants only: a custom_vjp function may not close over tracers.)
    def logits_of(hc, w):
        logits = jnp.dot(hc.astype(compute_dtype), w.T, preferred_element_type=jnp.float32)
        return jnp.where(jnp.arange(v) < valid_vocab, logits, -jnp.inf)

    def loss_only(hc, head, tc, needed):
        w = head.astype(compute_dtype)  # cast once, outside the chunk loop

        def body(total, xs):
            k, x, tt = xs
            return jax.lax.cond(k < needed, lambda: total + _nll(logits_of(x, w), tt)[0], lambda: total), None

        return jax.lax.scan(body, jnp.zeros((), jnp.float32), (jnp.arange(num_chunks), hc, tc))[0]

    @jax.custom_vjp
    def total_loss(hc, head, tc, needed):
        return loss_only(hc, head, tc, needed)

    def total_loss_fwd(hc, head, tc, needed):
        w = head.astype(compute_dtype)

        def chunk(carry, x, tt):
            total, dhead = carry
            logits = logits_of(x, w)
            loss, lse = _nll(logits, tt)
            onehot = (jnp.arange(v)[None, :] == tt[:, None]).astype(jnp.float32)
            supervised = (tt >= 0)[:, None].astype(jnp.float32)
            dlogits = ((jnp.exp(logits - lse[:, None]) - onehot) * supervised).astype(compute_dtype)
            dh = jnp.dot(dlogits, w, preferred_element_type=jnp.float32).astype(x.dtype)
            dhead = dhead + jnp.dot(dlogits.T, x.astype(compute_dtype), preferred_element_type=jnp.float32)
            return (total + loss, dhead), dh

        def body(carry, xs):
            k, x, tt = xs
            return jax.lax.cond(k < needed, chunk, lambda c, x, _: (c, jnp.zeros_like(x)), carry, x, tt)

        init = (jnp.zeros((), jnp.float32), jnp.zeros(head.shape, jnp.float32))
        (total, dhead), dh = jax.lax.scan(body, init, (jnp.arange(num_chunks), hc, tc))
        return total, (dh, dhead)

    def total_loss_bwd(res, g):
        dh, dhead = res
        return (g * dh.astype(jnp.float32)).astype(dh.dtype), (g * dhead).astype(head.dtype), None, None

    total_loss.defvjp(total_loss_fwd, total_loss_bwd)
    return total_loss(chunks_of(h), head, chunks_of(t), needed), (t >= 0).sum()


@jax.custom_vjp
def _permute(x: Float[Array, "g n d"], order: Int[Array, "g n"]) -> Float[Array, "g n d"]:
    """`x[g, order[g, i]]` for a permutation `order` of each group; the backward pass gathers by the inverse
    permutation (autodiff's transpose of a gather would be a scatter-add)."""
    return jnp.take_along_axis(x, order[..., None], axis=1, mode="promise_in_bounds")


def _permute_fwd(x, order):
    return _permute(x, order), order


def _permute_bwd(order, g):
    return _permute(g, jnp.argsort(order, axis=1)), None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _nll(logits: Float[Array, "c v"], targets: Int[Array, " c"]) -> tuple[Float[Array, ""], Float[Array, " c"]]:
    """Summed -log p(target) over targets >= 0, and each row's logsumexp."""
    lse, picked = _logsumexp_and_pick(logits, targets)
    return jnp.where(targets >= 0, lse - picked, 0.0).sum(), lse


def _logsumexp_and_pick(x: Float[Array, "c v"], targets: Int[Array, " c"]) -> tuple[Array, Array]:
    """Row-wise logsumexp, and `x[row, target]`: 0 where the target is negative (ignored), NaN where it is past the
    last column (bad targets stop training instead of passing silently).

    One read of `x` gives both: a variadic reduce carries an online max and rescaled sum, as in flash attention,
    and a masked sum for the target's logit. `jax.nn.logsumexp` reads the f32 logits twice, and at 4,096 tokens ×
    Qwen's vocab each read is 2.5 GB; a separate masked sum would be another read (XLA did not fuse it with the
    logsumexp). The pick is not a gather because, under a mesh, the logits are split over the vocab (the head's
    rows are sharded), and XLA re-laid them out between devices for the gather. Rows of all -inf give -inf."""

    def combine(a, b):
        (ma, sa, pa), (mb, sb, pb) = a, b
        m = jnp.maximum(ma, mb)
        finite = m > -jnp.inf  # both -inf: exp(-inf - -inf) would be nan
        safe_m = jnp.where(finite, m, 0.0)

        def scale(mx):
            return jnp.where(finite, jnp.exp(mx - safe_m), 0.0)

        return m, sa * scale(ma) + sb * scale(mb), pa + pb

    is_target = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1) == targets[..., None]
    zero = jnp.array(0.0, x.dtype)
    operands = (x, jnp.ones_like(x), jnp.where(is_target, x, zero))
    m, s, picked = jax.lax.reduce(operands, (jnp.array(-jnp.inf, x.dtype), zero, zero), combine, (x.ndim - 1,))
    return m + jnp.log(s), jnp.where(targets < x.shape[-1], picked, jnp.nan)
