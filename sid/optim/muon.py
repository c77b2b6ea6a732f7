"""Local Muon (`muon_local`): Keller Jordan's Muon on the stacked hidden matrices, AdamW on everything else.

For each hidden matrix ``W`` (stored ``[num_layers, out, in]``; any leading axes are batch axes) and gradient ``G``,
following https://github.com/KellerJordan/Muon:

    M ← β·M + (1-β)·G                            momentum buffer (float32), β = `momentum` = 0.95
    U ← β·M + (1-β)·G  (Nesterov)  or  U ← M
    O ← NS5(U)                                    quintic Newton–Schulz, (a, b, c) = (3.4445, -4.7750, 2.0315)
    W ← W - lr·(sqrt(max(1, out/in))·O + wd·W)    Keller Jordan's shape scale; decoupled decay multiplied by lr

NS5 normalises each matrix by its Frobenius norm (computed in float32, + 1e-7), transposes tall matrices so the Gram
matrix is the small one, and runs the iteration in `ns_dtype` (bfloat16 as in the reference, or float32). All
layers are orthogonalised at once by batched matmuls over the leading layer axis — no Python loop over layers.

The momentum is *not* bias-corrected (as in the reference): only the direction of U matters after NS5, and without
bias correction U's mix of M and G is the same at every step. `optax.contrib.muon` (`muon_optax`) bias-corrects the
two Nesterov terms separately, which changes the direction on early steps; see :mod:`sid.optim.muon_optax`.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from sid.optim.adamw import adamw
from sid.optim.routing import ADAMW, MUON, label_params

NS_COEFFS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic Newton–Schulz coefficients (maximal slope at 0; singular values end in ~[0.7, 1.2])."""
NS_EPS = 1e-7
"""Added to the Frobenius norm before normalising, as in the reference."""


def newton_schulz(
    x: Float[Array, "*batch rows cols"], *, steps: int = 5, dtype: jnp.dtype = jnp.bfloat16
) -> Float[Array, "*batch rows cols"]:
    """Approximately orthogonalise each matrix of `x` (its last two axes): ``U S Vᵀ ↦ ≈ U Vᵀ``, in `dtype`.

    Returns `dtype`. Leading axes are batch axes: one batched matmul per iteration orthogonalises them all.
    """
    if x.ndim < 2:
        raise ValueError(f"Newton–Schulz needs matrices (ndim >= 2), got shape {x.shape}")
    a, b, c = NS_COEFFS
    x = x.astype(jnp.float32)
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + NS_EPS)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # NS(Xᵀ) = NS(X)ᵀ; iterate on the wide side so X Xᵀ is the smaller Gram matrix.
        x = jnp.swapaxes(x, -1, -2)
    x = x.astype(dtype)
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return jnp.swapaxes(x, -1, -2) if tall else x


def shape_scale(shape: tuple[int, ...]) -> float:
    """Keller Jordan's update scale ``sqrt(max(1, out/in))`` for a ``[..., out, in]`` matrix."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


class ScaleByMuonState(NamedTuple):
    """Muon's momentum buffer (float32, one per hidden matrix)."""

    momentum: optax.Updates


def scale_by_muon(
    *, momentum: float, nesterov: bool, ns_steps: int, ns_dtype: jnp.dtype
) -> optax.GradientTransformation:
    """Momentum → (Nesterov) → Newton–Schulz → shape scale, on ``[..., out, in]`` leaves; output in float32."""

    def init_fn(params):
        return ScaleByMuonState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update_fn(updates, state, params=None):
        del params
        grads = jax.tree.map(lambda g: g.astype(jnp.float32), updates)
        buf = jax.tree.map(lambda m, g: momentum * m + (1 - momentum) * g, state.momentum, grads)
        mix = jax.tree.map(lambda m, g: momentum * m + (1 - momentum) * g, buf, grads) if nesterov else buf
        out = jax.tree.map(
            lambda u: newton_schulz(u, steps=ns_steps, dtype=ns_dtype).astype(jnp.float32) * shape_scale(u.shape), mix
        )
        return out, ScaleByMuonState(buf)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    aux_learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    ns_dtype: Literal["bfloat16", "float32"],
    weight_decay: float,
    b1: float,
    b2: float,
    eps: float,
    aux_weight_decay: float,
) -> optax.GradientTransformation:
    """Muon at `learning_rate` on hidden matrices, AdamW at `aux_learning_rate` on the rest (routing.label_params)."""
    muon_branch = optax.chain(
        scale_by_muon(momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, ns_dtype=jnp.dtype(ns_dtype)),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
    aux_branch = adamw(aux_learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=aux_weight_decay)
    return optax.partition({MUON: muon_branch, ADAMW: aux_branch}, label_params)
