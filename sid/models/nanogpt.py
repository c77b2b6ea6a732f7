"""Karpathy's nanoGPT (GPT-2 architecture) in Equinox: the regression workload for the shared trainer.

Learned token and position embeddings, pre-LN blocks (LayerNorm with an optional bias, causal self-attention,
4x GELU MLP), a final LayerNorm and an LM head tied to the token embedding. Dropout (embeddings, attention
weights, residual branches) is active iff a PRNG key is passed. Init: N(0, 0.02) everywhere, the residual
projections (attn.c_proj, mlp.c_proj) N(0, 0.02/sqrt(2 n_layer)), as in GPT-2. Blocks are stacked and scanned.
"""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from sid.models.config import GPTConfig
from sid.models.layers import DTYPES, LayerNorm, Linear, check_scan_unroll, dropout, scan_layers
from sid.parallel.rules import PartitionRules
from sid.parallel.trace import constrain_batch, constrain_table


class CausalSelfAttention(eqx.Module):
    """Multi-head causal self-attention with a fused qkv projection (GPT-2's c_attn layout: q | k | v)."""

    c_attn: Linear
    c_proj: Linear
    n_head: int = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    def __call__(
        self, x: Float[Array, "batch seq embed"], *, key: PRNGKeyArray | None
    ) -> Float[Array, "batch seq embed"]:
        """Attend causally; with a key, drop attention weights and the output."""
        b, t, c = x.shape
        q, k, v = (z.reshape(b, t, self.n_head, c // self.n_head) for z in jnp.split(self.c_attn(x), 3, axis=-1))
        if key is None:
            with jax.numpy_dtype_promotion("standard"):  # jax's XLA path promotes bf16 logits with a float32 constant
                y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        else:
            # dot_product_attention cannot drop attention weights, so training with dropout spells it out.
            key, k_attn = jax.random.split(key)
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
            scores = jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -jnp.inf)
            probs = dropout(jax.nn.softmax(scores, axis=-1), self.dropout, k_attn).astype(v.dtype)
            y = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return dropout(self.c_proj(y.reshape(b, t, c)), self.dropout, key)


class MLP(eqx.Module):
    """c_fc (4x) -> exact GELU -> c_proj -> dropout."""

    c_fc: Linear
    c_proj: Linear
    dropout: float = eqx.field(static=True)

    def __call__(self, x: Float[Array, "... embed"], *, key: PRNGKeyArray | None) -> Float[Array, "... embed"]:
        """Apply in the input's dtype."""
        return dropout(self.c_proj(jax.nn.gelu(self.c_fc(x), approximate=False)), self.dropout, key)


class Block(eqx.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then + mlp(ln_2(.))."""

    ln_1: LayerNorm
    attn: CausalSelfAttention
    ln_2: LayerNorm
    mlp: MLP

    @staticmethod
    def init(cfg: GPTConfig, *, key: PRNGKeyArray) -> Block:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        k1, k2, k3, k4 = jax.random.split(key, 4)
        d, std = cfg.n_embd, 0.02
        proj_std = std / math.sqrt(2 * cfg.n_layer)
        return Block(
            ln_1=LayerNorm.init(d, bias=cfg.bias),
            attn=CausalSelfAttention(
                c_attn=Linear.init(d, 3 * d, bias=cfg.bias, std=std, key=k1),
                c_proj=Linear.init(d, d, bias=cfg.bias, std=proj_std, key=k2),
                n_head=cfg.n_head,
                dropout=cfg.dropout,
            ),
            ln_2=LayerNorm.init(d, bias=cfg.bias),
            mlp=MLP(
                c_fc=Linear.init(d, 4 * d, bias=cfg.bias, std=std, key=k3),
                c_proj=Linear.init(4 * d, d, bias=cfg.bias, std=proj_std, key=k4),
                dropout=cfg.dropout,
            ),
        )

    def __call__(
        self, x: Float[Array, "batch seq embed"], *, key: PRNGKeyArray | None
    ) -> Float[Array, "batch seq embed"]:
        """One block; dropout iff key."""
        k_attn, k_mlp = (None, None) if key is None else jax.random.split(key)
        x = x + self.attn(self.ln_1(x), key=k_attn)
        return x + self.mlp(self.ln_2(x), key=k_mlp)


class GPT(eqx.Module):
    """nanoGPT: `__call__` gives final hidden states, `logits` maps them through the tied head."""

    wte: Float[Array, "vocab embed"]
    wpe: Float[Array, "block embed"]
    layers: Block
    """Every array has a leading [n_layer] axis (scanned)."""
    ln_f: LayerNorm
    config: GPTConfig = eqx.field(static=True)
    partition_rules: ClassVar[PartitionRules] = PartitionRules(
        column=frozenset({"c_attn", "c_fc"}), row=frozenset({"c_proj"}), vocab=frozenset({"wte"})
    )
    """tp splits attention heads and MLP width (sid.parallel.rules)."""

    @staticmethod
    def init(cfg: GPTConfig, *, key: PRNGKeyArray) -> GPT:
        """From scratch with GPT-2's init."""
        if cfg.vocab_size <= 0:
            raise ValueError("GPTConfig.vocab_size must be set (> 0) before building the model")
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} must be a multiple of n_head={cfg.n_head}")
        check_scan_unroll(cfg.scan_unroll)
        k_te, k_pe, k_layers = jax.random.split(key, 3)
        return GPT(
            wte=0.02 * jax.random.normal(k_te, (cfg.vocab_size, cfg.n_embd), jnp.float32),
            wpe=0.02 * jax.random.normal(k_pe, (cfg.block_size, cfg.n_embd), jnp.float32),
            layers=eqx.filter_vmap(lambda k: Block.init(cfg, key=k))(jax.random.split(k_layers, cfg.n_layer)),
            ln_f=LayerNorm.init(cfg.n_embd, bias=cfg.bias),
            config=cfg,
        )

    def __call__(
        self, idx: Int[Array, "batch seq"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "batch seq embed"]:
        """Hidden states after ln_f (compute dtype); dropout is active iff `key` is given."""
        t = idx.shape[1]
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        dtype = DTYPES[self.config.compute_dtype]
        k_emb, k_layers = (None, None) if key is None else jax.random.split(key)
        x = dropout(
            (jnp.take(constrain_table(self.wte), idx, axis=0) + self.wpe[:t]).astype(dtype), self.config.dropout, k_emb
        )
        layer_keys = None if k_layers is None else jax.random.split(k_layers, self.config.n_layer)
        x, _ = scan_layers(
            lambda block, x, k: (constrain_batch(block(x, key=k)), None),
            x,
            self.layers,
            layer_keys,
            remat=self.config.remat,
            unroll=self.config.scan_unroll,
        )
        return self.ln_f(x)

    def head_weight(self) -> Float[Array, "vocab embed"]:
        """The tied LM head matrix [V, D] (= wte)."""
        return self.wte

    def logits(self, hidden: Float[Array, "... embed"]) -> Float[Array, "... vocab"]:
        """float32 logits through the tied head."""
        return jnp.einsum("...d,vd->...v", hidden, self.wte.astype(hidden.dtype), preferred_element_type=jnp.float32)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; like nanoGPT's, it leaves out the position embeddings by default (the token embedding
        counts because the head reuses it). Works on `eqx.filter_eval_shape` output too."""
        total = sum(x.size for x in jax.tree.leaves(self))
        return total - self.wpe.size if non_embedding else total
