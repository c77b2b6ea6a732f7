"""AdamW: the `adamw` optimizer, and the AdamW branch (embeddings, head, norms, biases) under both Muons.

Decoupled weight decay on matrices only (:func:`sid.optim.routing.decay_mask`), multiplied by the learning rate as
in PyTorch; both moments in float32.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from sid.optim.routing import decay_mask


def adamw(
    learning_rate: optax.ScalarOrSchedule, *, b1: float, b2: float, eps: float, weight_decay: float
) -> optax.GradientTransformation:
    """optax AdamW with f32 moments whose weight decay skips norms, biases and other vectors."""
    # `nu` is zeros_like(params), so it is float32 whenever params are; `mu_dtype` pins the first moment too.
    return optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask, mu_dtype=jnp.float32
    )
