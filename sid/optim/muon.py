"""Local Muon (`muon_local`): Keller Jordan's Muon for the stacked hidden matrices (`sid.optim.routing.route` gives
AdamW everything else).

For each hidden matrix ``W`` (stored ``[num_layers, out, in]``; any leading axes are batch axes) and gradient ``G``,
following https://github.com/KellerJordan/Muon:

    M ← β·M + (1-β)·G                            momentum buffer (float32), β = `momentum` = 0.95
    U ← β·M + (1-β)·G  (Nesterov)  or  U ← M
    O ← NS5(U)                                    quintic Newton–Schulz, (a, b, c) = (3.4445, -4.7750, 2.0315)
    W ← W - lr·(sqrt(max(1, out/in))·O + wd·W)    Keller Jordan's shape scale; decoupled decay multiplied by lr

NS5 normalises each matrix by its Frobenius norm (computed in float32, + 1e-7), transposes tall matrices so the Gram
matrix is the small one, and runs the iteration in `ns_dtype`. All layers are orthogonalised at once by batched
matmuls over the leading layer axis — no Python loop over layers. Over a mesh, `orthogonalize` first re-splits each
stack by layer, so every device iterates on whole matrices of its share of the layers and no collective runs inside
the iteration. Two ways to compute the same iteration:

- ``standard`` (Keller Jordan's): ``A = X Xᵀ; X ← a·X + (b·A + c·A²)·X``, every matmul in bfloat16 (computed as
  ``X ← P·X`` with the m×m ``P = a·I + b·A + c·A²``). For an m×n matrix
  (m ≤ n) that is ``4m²n + 2m³`` multiply-adds per step, most of them on the wide X.
- ``gram`` (Dao AI Lab's Gram Newton–Schulz, https://tridao.me/blog/2026/gram-newton-schulz/): every step multiplies X
  on the left by the m×m polynomial ``P = a·I + b·G + c·G²`` of ``G = X Xᵀ``, so X_k = Q_k X_0 with ``Q ← P·Q``, and G
  follows without touching X: ``G ← P·G·P``. X is read only when a block starts (G = X Xᵀ) and ends (X ← Q X):
  ``8m²n + 28m³`` for 5 steps instead of ``20m²n + 10m³``, 41% fewer FLOPs on a 1536×8960 MLP matrix. The recurrence
  on G lets rounding errors compound (in bfloat16 small eigenvalues of G turn negative and then grow by a² per step,
  so the output diverges), hence two precautions from the same work: a restart after step 2 (G recomputed from
  the current X) and float16 matmuls (3 more mantissa bits than bfloat16; entries of a normalised X and of G, P,
  Q stay well inside its range). On power-law spectra the result is closer to float32 NS than bfloat16 standard
  NS is (tests/test_optim.py). Matrices where it would not save FLOPs (n ≤ 1.5m, e.g. square q/o projections)
  use the standard form. TPU matrix units take bfloat16 but not float16, so `OptimizerConfig.ns_method: auto`
  keeps the standard form there.

The momentum is *not* bias-corrected (as in the reference): only the direction of U matters after NS5, and without
bias correction U's mix of M and G is the same at every step. `optax.contrib.muon` (`muon_optax`) bias-corrects the
two Nesterov terms separately, which changes the direction on early steps; see :mod:`sid.optim.muon_optax`.
"""

from __future__ import annotations

import itertools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from sid.parallel.layer_split import split_by_layer, unsplit_by_layer

NS_COEFFS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic Newton–Schulz coefficients (maximal slope at 0; singular values end in ~[0.7, 1.2])."""
NS_EPS = 1e-7
"""Added to the Frobenius norm before normalising, as in the reference."""
NS_METHODS = ("standard", "gram")
"""Ways to compute the same iteration (module docstring)."""
GRAM_RESTARTS = (2,)
"""Steps after which Gram NS recomputes G from X (the restart that keeps half precision stable)."""


def ns_flops(rows: int, cols: int, *, steps: int, method: str) -> int:
    """FLOPs `newton_schulz` spends on one rows×cols matrix (under `gram`, the cheaper of the two forms)."""
    m, n = min(rows, cols), max(rows, cols)
    standard = _standard_flops(m, n, steps)
    return min(standard, _gram_flops(m, n, steps)) if method == "gram" else standard


def _standard_flops(m: int, n: int, steps: int) -> int:
    return steps * (4 * m * m * n + 2 * m**3)


def _gram_flops(m: int, n: int, steps: int) -> int:
    total = 0
    for lo, hi in _blocks(steps, GRAM_RESTARTS):
        k = hi - lo  # per block: G = X Xᵀ and X ← Q X on the wide side; per step G², and P·Q, P·G·P except at the ends
        total += 4 * m * m * n + m**3 * (2 * k + 2 * (k - 1) + 4 * (k - 1))
    return total


def _blocks(steps: int, restarts: tuple[int, ...]) -> list[tuple[int, int]]:
    """[lo, hi) step ranges between restarts."""
    bounds = [0, *sorted(r for r in set(restarts) if 0 < r < steps), steps]
    return list(itertools.pairwise(bounds))


def newton_schulz(
    x: Float[Array, "*batch rows cols"],
    *,
    steps: int = 5,
    dtype: jnp.dtype = jnp.bfloat16,
    method: Literal["standard", "gram"] = "standard",
) -> Float[Array, "*batch rows cols"]:
    """Approximately orthogonalise each matrix of `x` (its last two axes): ``U S Vᵀ ↦ ≈ U Vᵀ``, matmuls in `dtype`.

    Returns `dtype`. Leading axes are batch axes: one batched matmul per iteration orthogonalises them all.
    `method="gram"` iterates on the Gram matrix where that takes fewer FLOPs (module docstring).
    """
    return _iterate(_normalized(x, dtype), steps=steps, method=method)


def _normalized(x: Array, dtype: jnp.dtype) -> Array:
    """Each matrix divided by its Frobenius norm (in f32), then cast to the iteration's dtype."""
    if x.ndim < 2:
        raise ValueError(f"Newton–Schulz needs matrices (ndim >= 2), got shape {x.shape}")
    x = x.astype(jnp.float32)
    return (x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + NS_EPS)).astype(dtype)


def _iterate(x: Array, *, steps: int, method: str) -> Array:
    """The NS steps on normalised matrices, in x.dtype."""
    if method not in NS_METHODS:
        raise ValueError(f"unknown Newton–Schulz method {method!r}: expected one of {', '.join(NS_METHODS)}")
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # NS(Xᵀ) = NS(X)ᵀ; iterate on the wide side so X Xᵀ is the smaller Gram matrix.
        x = jnp.swapaxes(x, -1, -2)
    rows, cols = x.shape[-2:]
    if method == "gram" and _gram_flops(rows, cols, steps) < _standard_flops(rows, cols, steps):
        x = _gram_iterations(x, steps)
    else:
        x = _standard_iterations(x, steps)
    return jnp.swapaxes(x, -1, -2) if tall else x


def _standard_iterations(x: Array, steps: int) -> Array:
    """Keller Jordan's step ``X ← a·X + (b·A + c·A²)·X`` written as ``X ← P·X`` (`_polynomial` on the small m×m side):
    the same products, without an elementwise pass over the wide X per step."""
    for _ in range(steps):
        x = _polynomial(x @ jnp.swapaxes(x, -1, -2)) @ x
    return x


def _polynomial(gram: Array) -> Array:
    """``P = a·I + b·G + c·G²`` of a Gram matrix: G² in G's dtype, the sum in f32, returned in G's dtype."""
    a, b, c = NS_COEFFS
    square = jnp.matmul(gram, gram, preferred_element_type=gram.dtype)
    eye = jnp.eye(gram.shape[-1], dtype=jnp.float32)
    return (a * eye + b * gram.astype(jnp.float32) + c * square.astype(jnp.float32)).astype(gram.dtype)


def _gram_iterations(x: Array, steps: int) -> Array:
    """The NS steps as X ← Q X with Q a product of polynomials in G = X Xᵀ.

    Matmuls take and return x.dtype (accumulating in f32): every operand is rounded to x.dtype before its next
    matmul anyway, so f32 outputs would only add a conversion pass per product. P is summed in f32."""
    dtype = x.dtype

    def mm(u, v):
        return jnp.matmul(u, v, preferred_element_type=dtype)

    for lo, hi in _blocks(steps, GRAM_RESTARTS):
        gram = mm(x, jnp.swapaxes(x, -1, -2))
        q = None
        for i in range(lo, hi):
            p = _polynomial(gram)
            q = p if q is None else mm(p, q)
            if i < hi - 1:  # X ← P X gives G ← P G Pᵀ = P G P (P is symmetric)
                gram = mm(mm(p, gram), p)
        x = mm(q, x)
    return x


def orthogonalize(
    u: Float[Array, "*batch rows cols"], *, steps: int, dtype: jnp.dtype, method: Literal["standard", "gram"]
) -> Float[Array, "*batch rows cols"]:
    """`newton_schulz(u)`, with whole matrices on each device when the params are split over a mesh.

    A layer stack ``[layers, out, in]`` arrives split like its param (fsdp and tp inside each matrix). Iterating on
    that layout makes every Newton–Schulz step all-reduce partial Gram matrices and all-gather them back, and every
    device repeats the m×m products of every layer. Instead the normalised stack (already in the iteration's
    dtype) is re-split by layer, with an all-to-all per mesh axis and the layer count padded with zero matrices
    (whose NS is zero) to a multiple of the devices. Each device iterates on its own layers, and the same
    all-to-alls in reverse restore the param's split. The iteration per matrix is the same either way."""
    x = split_by_layer(_normalized(u, dtype))
    return unsplit_by_layer(_iterate(x, steps=steps, method=method), u.shape[0])


def shape_scale(shape: tuple[int, ...]) -> float:
    """Keller Jordan's update scale ``sqrt(max(1, out/in))`` for a ``[..., out, in]`` matrix."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


class ScaleByMuonState(NamedTuple):
    """Muon's momentum buffer (float32, one per hidden matrix)."""

    momentum: optax.Updates


def scale_by_muon(
    *, momentum: float, nesterov: bool, ns_steps: int, ns_dtype: jnp.dtype, ns_method: str = "standard"
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
            lambda u: (
                orthogonalize(u, steps=ns_steps, dtype=ns_dtype, method=ns_method).astype(jnp.float32)
                * shape_scale(u.shape)
            ),
            mix,
        )
        return out, ScaleByMuonState(buf)

    return optax.GradientTransformation(init_fn, update_fn)


def muon(
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    ns_dtype: Literal["bfloat16", "float16", "float32"],
    ns_method: Literal["standard", "gram"],
    weight_decay: float,
) -> optax.GradientTransformation:
    """Muon at `learning_rate`, for the hidden matrices (`sid.optim.routing.route` pairs it with AdamW)."""
    return optax.chain(
        scale_by_muon(
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=jnp.dtype(ns_dtype),
            ns_method=ns_method,
        ),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )
