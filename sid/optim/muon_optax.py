"""optax's Muon (`muon_optax`): `optax.contrib.muon` for the stacked hidden matrices (`sid.optim.routing.route`
gives AdamW everything else).

Dimension numbers. optax assumes ``x @ W`` weights, ``(in, out)``; ours are ``[num_layers, out, in]`` like torch and
``eqx.nn.Linear``. So ``reduction_axis=-1`` (in) and ``output_axis=-2`` (out); every other axis (the layer axis) is
a batch axis that optax vmaps over, so each layer is orthogonalised on its own. This also makes optax's width scale
``sqrt(max(1, fan_out/fan_in))`` equal Keller Jordan's ``sqrt(max(1, out/in))``; swapped axes would silently give
``sqrt(max(1, in/out))`` instead.

Routing. Hidden matrices are routed to optax's Muon by :func:`sid.optim.routing.route`; everything else goes
to the same AdamW branch as under `muon_local` (:func:`sid.optim.adamw.adamw` at the aux LR), not to optax's
built-in Adam branch, because that one (a) decays every leaf it owns, norms and biases included, since it takes no
mask, and (b) is Nesterov-AdamW whenever Muon's `nesterov` is on. Sharing the branch means `muon_local` and
`muon_optax` differ only in the Muon rule.

Differences from `muon_local` (as of optax 0.2.8, all tested in tests/test_optim.py):

- Nesterov: optax bias-corrects the two terms separately,
  ``U = β·M_t/(1-β^(t+1)) + (1-β)·G_t/(1-β^t)``, where `muon_local` uses ``U = β·M_t + (1-β)·G_t``. The first
  update's direction is the same (both ∝ G_1); later ones differ by a weighting that vanishes as β^t → 0. Without
  Nesterov, optax's bias correction is a positive scalar, which NS removes: the two agree at every step.
- Newton–Schulz runs in the momentum dtype (float32), in the standard form, with eps 1e-8; `muon_local` uses
  `ns_dtype` and `ns_method` (by default the Gram form in float16, on GPU and CPU) with eps 1e-7. Same
  coefficients (3.4445, -4.7750, 2.0315), same number of steps, same Frobenius normalisation, same
  transpose-the-tall-side trick (optax transposes to ``(in, out)`` first, which NS commutes with).
- Same shape scale and the same decoupled weight decay ``-lr·wd·W`` on the hidden matrices.

Over a mesh, optax's branch runs on layer stacks re-split by layer (:func:`sid.parallel.layer_split.split_by_layer`,
as `muon_local` does for its Newton–Schulz): optax's NS has no hook for the layout, and on the params' own split every
NS step all-gathered and all-reduced partial Gram matrices (docs/benchmarks.md, "`muon_optax` over a mesh").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import optax.contrib

from sid.parallel.layer_split import split_by_layer, unsplit_by_layer

DIMENSION_NUMBERS = optax.contrib.MuonDimensionNumbers(reduction_axis=-1, output_axis=-2)
"""``[..., out, in]``: reduce over `in`, output `out`, leading axes are batch."""


def muon(
    learning_rate: optax.ScalarOrSchedule, *, momentum: float, nesterov: bool, ns_steps: int, weight_decay: float
) -> optax.GradientTransformation:
    """optax's Muon at `learning_rate`, for the hidden matrices (`sid.optim.routing.route` pairs it with AdamW)."""
    # One dimension-numbers leaf is a prefix of the whole subtree: every leaf the routing hands this branch is a
    # hidden matrix, so optax's own Adam branch receives nothing.
    return by_layer(
        optax.contrib.muon(
            learning_rate,
            ns_steps=ns_steps,
            beta=momentum,
            weight_decay=weight_decay,
            mu_dtype=jnp.float32,
            nesterov=nesterov,
            muon_weight_dimension_numbers=DIMENSION_NUMBERS,
        )
    )


def by_layer(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` (optax's Muon) on whole matrices per device: its updates, params and momentum enter re-split by layer
    (zero layers padded on, whose momentum, NS and decay stay zero) and leave split like the params again. Without
    a mesh (or with one device) this is `inner` itself."""

    def into(tree):
        return jax.tree.map(split_by_layer, tree)

    def back(tree, like):
        return jax.tree.map(lambda x, o: unsplit_by_layer(x, o.shape[0]), tree, like)

    def with_momentum(state, momentum_of, old_state):
        """`state` with each MuonState's momentum `mu` replaced by `momentum_of(mu, that MuonState's mu in
        old_state)` (old_state has the same structure: the layer counts to restore come from it)."""
        return jax.tree.map(
            lambda s, o: s._replace(mu=momentum_of(s.mu, o.mu)) if _is_muon_state(s) else s,
            state,
            old_state,
            is_leaf=_is_muon_state,
        )

    def update_fn(updates, state, params=None):
        split_state = with_momentum(state, lambda mu, _: into(mu), state)
        new_updates, new_state = inner.update(into(updates), split_state, None if params is None else into(params))
        return back(new_updates, updates), with_momentum(new_state, back, state)

    return optax.GradientTransformation(inner.init, update_fn)


def _is_muon_state(x) -> bool:
    return isinstance(x, optax.contrib.MuonState)
