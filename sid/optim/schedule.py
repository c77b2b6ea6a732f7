"""Learning-rate schedules: linear warmup, then constant, linear or cosine decay.

The schedule is indexed by optax's update count ``t`` (0 for the first update). Warmup gives
``peak * (t + 1) / (warmup_steps + 1)`` for ``t < warmup_steps``, so the first update already moves the weights
(``peak / (warmup_steps + 1)``, never 0, unlike HF's warmup that starts at 0) and update ``t = warmup_steps`` is
the first at the peak. With ``warmup_steps = 0`` the first update uses the peak.

Decay then runs over ``progress = (t - warmup_steps) / (total_steps - warmup_steps)`` and reaches
``peak * min_lr_ratio`` at ``t = total_steps``, one past the last update, so the last update (``t = total_steps-1``)
still has a non-zero learning rate even when ``min_lr_ratio = 0`` (as HF's linear schedule). Past the end it stays
at the floor.
"""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import optax


def make_schedule(
    peak: float,
    *,
    warmup_steps: int,
    total_steps: int,
    kind: Literal["constant", "linear", "cosine"],
    min_lr_ratio: float,
) -> optax.Schedule:
    """Linear warmup to `peak` over `warmup_steps` updates, then `kind` decay to `peak * min_lr_ratio`."""
    if peak < 0:
        raise ValueError(f"peak learning rate must be >= 0, got {peak}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule kind {kind!r} (constant, linear, cosine)")
    decay_steps = max(total_steps - warmup_steps, 1)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        warm = peak * (t + 1.0) / (warmup_steps + 1.0)
        progress = jnp.clip((t - warmup_steps) / decay_steps, 0.0, 1.0)
        if kind == "constant":
            factor = jnp.ones_like(progress)
        elif kind == "linear":
            factor = 1.0 - (1.0 - min_lr_ratio) * progress
        else:
            factor = min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(t < warmup_steps, warm, peak * factor)

    return schedule
