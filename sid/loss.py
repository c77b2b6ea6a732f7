"""Next-token cross-entropy in f32 without materialising f32 logits for every token × the whole vocab.

Tokens are processed in chunks under `jax.checkpoint`, so forward and backward each hold one chunk's logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

IGNORE = -100
_CHUNK_ELEMENTS = 1 << 26  # logits elements per chunk (256 MiB in f32)


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
    from the softmax (padded vocab rows can never be predicted).
    """
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    t = targets.reshape(-1)
    n, v = h.shape[0], head.shape[0]
    c = chunk_size(n, v)
    w = head.astype(compute_dtype)
    vocab_ok = jnp.arange(v) < valid_vocab

    @jax.checkpoint
    def chunk_loss(hc, tc):
        logits = jnp.dot(hc.astype(compute_dtype), w.T, preferred_element_type=jnp.float32)
        logits = jnp.where(vocab_ok, logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, jnp.maximum(tc, 0)[:, None], axis=-1)[:, 0]
        return jnp.where(tc >= 0, lse - picked, 0.0).sum()

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h.reshape(n // c, c, d), t.reshape(n // c, c)))
    return total, (t >= 0).sum()
