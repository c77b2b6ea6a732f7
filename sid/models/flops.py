"""Model FLOPs of a training step, as MFU counts them, for both model families (one formula).

Per token: 6 x the layers' matmul params (forward + backward) + 12 x layers x attention width x seq_len for the
attention scores and mixing. Per supervised token: 6 x the head's params, which the loss multiplies only for those
(sid.loss); counted even when the head is tied, since the embedding lookup is not a matmul. Position embeddings
(nanoGPT's wpe) are lookups too, and are not counted.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax

from sid.models.config import GPTConfig


class TrainFlops(NamedTuple):
    """Model FLOPs of training, as MFU counts them: `per_token` for every real token (the layers' matmuls and
    attention), and `per_target` more for each supervised token (the head's matmul, which the loss computes only for
    those: sid.loss). With every token supervised that is the usual 6N + attention per token."""

    per_token: float
    per_target: float

    def __call__(self, tokens: float, targets: float) -> float:
        return self.per_token * tokens + self.per_target * targets


def num_params(model: eqx.Module) -> int:
    """Parameters counted once (a tied head is the embedding)."""
    return sum(x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


def train_flops(model: eqx.Module, seq_len: int) -> TrainFlops:
    """The training FLOPs of `model` (a Qwen2 or a nanoGPT) on rows of `seq_len` tokens (nanoGPT trains on rows of
    its block size)."""
    head = model.head_weight().size
    if isinstance(model.config, GPTConfig):
        c = model.config
        tables = model.wte.size + model.wpe.size
        layers, attn_width = c.n_layer, c.n_embd
    else:
        c = model.config
        tables = model.embed.weight.size + (0 if model.lm_head is None else head)
        layers, attn_width = c.num_layers, c.num_heads * c.head_dim
    matmul_params = num_params(model) - tables
    return TrainFlops(6.0 * matmul_params + 12.0 * layers * attn_width * seq_len, 6.0 * head)
