"""Next-token cross-entropy in f32 without materialising f32 logits for every token × the whole vocab.

Tokens are processed in chunks with a hand-written backward pass, so forward and backward each hold one chunk's
logits. The backward recomputes the chunk's logits, forms d(loss)/d(logits) = softmax - onehot in f32, and casts it
to the compute dtype before the two gradient matmuls: left to autodiff, those would run with f32 operands (the f32
cotangent promotes the bf16 weights), the slowest matmuls of a training step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

IGNORE = -100
_CHUNK_ELEMENTS = 1 << 28  # logits elements per chunk (1 GiB in f32): few chunks, few passes over d(head)


def chunk_size(num_tokens: int, vocab: int) -> int:
    """Tokens per chunk: as many as fit the element budget, dividing num_tokens exactly."""
    target = max(1, min(num_tokens, _CHUNK_ELEMENTS // max(vocab, 1)))
    while num_tokens % target:
        target -= 1
    return target


def cross_entropy_sum(
    hidden: Float[Array, "... d"],
    head: Float[Array, "v d"],
    targets: Int[Array, "..."],
    *,
    valid_vocab: int,
    compute_dtype=jnp.bfloat16,
) -> tuple[Float[Array, ""], Int[Array, ""]]:
    """Sum of -log p(target) over tokens with target >= 0, and the number of such tokens.

    Logits are `hidden @ head.T` in `compute_dtype` with f32 accumulation; ids >= valid_vocab are excluded
    from the softmax (padded vocab rows can never be predicted). Gradients flow to `hidden` and `head`
    (d(head) accumulated in f32 over the chunks).
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1)
    n, v = h.shape[0], head.shape[0]
    c = chunk_size(n, v)

    def logits_of(hc, w):  # (built inside: a custom_vjp function may not close over traced arrays)
        logits = jnp.dot(hc.astype(compute_dtype), w.T, preferred_element_type=jnp.float32)
        return jnp.where(jnp.arange(v) < valid_vocab, logits, -jnp.inf)

    @jax.custom_vjp
    def chunk_loss(hc, head, w, tc):
        return _nll(logits_of(hc, w), tc)[0]

    def chunk_fwd(hc, head, w, tc):
        loss, lse = _nll(logits_of(hc, w), tc)
        return loss, (hc, w, tc, lse)

    def chunk_bwd(res, g):
        hc, w, tc, lse = res
        probs = jnp.exp(logits_of(hc, w) - lse[:, None])
        onehot = jnp.arange(v)[None, :] == tc[:, None]
        dlogits = ((probs - onehot) * jnp.where(tc >= 0, g, 0.0)[:, None]).astype(compute_dtype)
        dh = jnp.dot(dlogits, w, preferred_element_type=jnp.float32).astype(hc.dtype)
        dhead = jnp.dot(dlogits.T, hc.astype(compute_dtype), preferred_element_type=jnp.float32)
        # `w` is the compute-dtype copy of `head`; its gradient is delivered through `head` (f32) instead.
        return dh, dhead.astype(head.dtype), None, None

    chunk_loss.defvjp(chunk_fwd, chunk_bwd)
    w = jax.lax.stop_gradient(head.astype(compute_dtype))  # cast once, outside the chunk loop

    def body(total, xs):
        return total + chunk_loss(xs[0], head, w, xs[1]), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h.reshape(n // c, c, d), t.reshape(n // c, c)))
    return total, (t >= 0).sum()


def _nll(logits: Float[Array, "c v"], targets: Int[Array, " c"]) -> tuple[Float[Array, ""], Float[Array, " c"]]:
    """Summed -log p(target) over targets >= 0, and each row's logsumexp."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(targets >= 0, lse - picked, 0.0).sum(), lse
