"""optax's Muon (`muon_optax`): `optax.contrib.muon` on the stacked hidden matrices, AdamW on everything else.

Dimension numbers. optax assumes ``x @ W`` weights, ``(in, out)``; ours are ``[num_layers, out, in]`` like torch and
``eqx.nn.Linear``. So ``reduction_axis=-1`` (in) and ``output_axis=-2`` (out); every other axis (the layer axis) is
a batch axis that optax vmaps over, so each layer is orthogonalised on its own. This also makes optax's width scale
``sqrt(max(1, fan_out/fan_in))`` equal Keller Jordan's ``sqrt(max(1, out/in))``; swapped axes would silently give
``sqrt(max(1, in/out))`` instead.

Routing. Hidden matrices are routed to optax's Muon by :func:`sid.optim.routing.label_params`; everything else goes
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
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
import optax.contrib

from sid.optim.adamw import adamw
from sid.optim.routing import ADAMW, MUON, label_params

DIMENSION_NUMBERS = optax.contrib.MuonDimensionNumbers(reduction_axis=-1, output_axis=-2)
"""``[..., out, in]``: reduce over `in`, output `out`, leading axes are batch."""


def muon(
    learning_rate: optax.ScalarOrSchedule,
    aux_learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float,
    nesterov: bool,
    ns_steps: int,
    weight_decay: float,
    b1: float,
    b2: float,
    eps: float,
    aux_weight_decay: float,
) -> optax.GradientTransformation:
    """optax Muon at `learning_rate` on hidden matrices, AdamW at `aux_learning_rate` on the rest."""
    # A single dimension-numbers leaf is a prefix of the whole (masked) subtree: every leaf partition hands this
    # branch is a hidden matrix, so optax's own Adam branch receives nothing.
    muon_branch = optax.contrib.muon(
        learning_rate,
        ns_steps=ns_steps,
        beta=momentum,
        weight_decay=weight_decay,
        mu_dtype=jnp.float32,
        nesterov=nesterov,
        muon_weight_dimension_numbers=DIMENSION_NUMBERS,
    )
    aux_branch = adamw(aux_learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=aux_weight_decay)
    return optax.partition({MUON: muon_branch, ADAMW: aux_branch}, label_params)
