"""OptimizerConfig: which update rule, with what hyperparameters; `build()` returns an optax transformation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from sid.optim.adamw import adamw
from sid.optim.muon import muon as muon_local
from sid.optim.muon_optax import muon as muon_optax
from sid.optim.routing import route


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer. Under Muon, 2-D hidden matrices take Muon at the train learning rate and everything else
    (embeddings, LM head, norms, biases) takes AdamW at the aux learning rate."""

    name: Literal["adamw", "muon_local", "muon_optax"] = "adamw"
    """adamw; muon_local (this package's Muon); muon_optax (optax.contrib.muon)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """Decoupled weight decay on matrices (ndim ≥ 2); norms, biases and vectors are never decayed."""
    aux_weight_decay: float = 0.0
    """Decoupled weight decay of the AdamW branch under Muon (matrices only: embeddings, LM head)."""
    momentum: float = 0.95
    """Muon momentum."""
    nesterov: bool = True
    """Muon Nesterov momentum."""
    ns_steps: int = 5
    """Newton–Schulz iterations."""
    ns_method: Literal["auto", "gram", "standard"] = "auto"
    """How muon_local computes Newton–Schulz: gram (the same iteration on X Xᵀ, fewer FLOPs on wide matrices) or
    standard (Keller Jordan's form); see sid/optim/muon.py. auto: gram, except on TPU, whose matrix units take
    bfloat16 but not the float16 that gram needs to stay accurate, so there standard."""
    ns_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Newton–Schulz matmul dtype of muon_local; auto: float16 for gram (its stability needs the mantissa),
    bfloat16 for standard (as in Keller Jordan's reference). muon_optax always uses float32."""

    def __post_init__(self):
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ValueError(f"beta1, beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.eps <= 0.0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.weight_decay < 0.0 or self.aux_weight_decay < 0.0:
            raise ValueError(f"weight decays must be >= 0, got {self.weight_decay}, {self.aux_weight_decay}")
        if self.ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {self.ns_steps}")

    @property
    def resolved_ns_method(self) -> str:
        """The Newton–Schulz form `auto` stands for on the default backend."""
        if self.ns_method != "auto":
            return self.ns_method
        return "standard" if jax.default_backend() == "tpu" else "gram"

    @property
    def resolved_ns_dtype(self) -> str:
        """The Newton–Schulz dtype `auto` stands for under the resolved ns_method."""
        if self.ns_dtype != "auto":
            return self.ns_dtype
        return "float16" if self.resolved_ns_method == "gram" else "bfloat16"

    def build(
        self,
        *,
        learning_rate: optax.ScalarOrSchedule,
        aux_learning_rate: optax.ScalarOrSchedule,
        clip_norm: float,
    ) -> optax.GradientTransformation:
        """The optax transformation: cast grads to float32, clip their global norm to `clip_norm` (0: no clip),
        then the update rule. Under `adamw` every parameter uses `learning_rate` and `aux_learning_rate` is unused;
        under the Muons, hidden matrices use `learning_rate` and the rest `aux_learning_rate` (routing.py)."""
        if clip_norm < 0:
            raise ValueError(f"clip_norm must be >= 0, got {clip_norm}")
        adam_kw = dict(b1=self.beta1, b2=self.beta2, eps=self.eps)
        muon_kw = dict(momentum=self.momentum, nesterov=self.nesterov, ns_steps=self.ns_steps)
        aux = adamw(aux_learning_rate, **adam_kw, weight_decay=self.aux_weight_decay)  # the Muons' non-matrix branch
        if self.name == "adamw":
            rule = adamw(learning_rate, **adam_kw, weight_decay=self.weight_decay)
        elif self.name == "muon_local":
            ns = dict(ns_dtype=self.resolved_ns_dtype, ns_method=self.resolved_ns_method)
            rule = route(muon_local(learning_rate, **muon_kw, **ns, weight_decay=self.weight_decay), aux)
        elif self.name == "muon_optax":
            rule = route(muon_optax(learning_rate, **muon_kw, weight_decay=self.weight_decay), aux)
        else:
            raise ValueError(f"unknown optimizer {self.name!r}")
        # Clip (and run every moment update) in float32 even if the grads arrive in bfloat16.
        upcast = optax.stateless(lambda g, _: jax.tree.map(lambda x: x.astype(jnp.float32), g))
        clip = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
        return optax.chain(upcast, *clip, rule)
