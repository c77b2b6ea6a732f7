"""RQ-VAE: an MLP autoencoder whose latent is quantized by residual VQ (Lee et al. 2022; TIGER's tokenizer).

Loss = reconstruction MSE + per level ||sg(r) - c||^2 (moves codes) + commitment * ||r - sg(c)||^2 (moves the
encoder), with the straight-through estimator carrying the decoder's gradient past the quantizer. The codebooks
start as residual k-means of the freshly initialized encoder's latents, so no code starts dead. Everything is
f32: the model is small and the codes depend on exact distance ties.
"""

from __future__ import annotations

from typing import Protocol

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from sid.index.kmeans import sq_distances
from sid.index.residual import Quantized, residual_kmeans


class RQVAESettings(Protocol):
    """What training an RQ-VAE reads (`sid.index.config.QuantizerConfig` has these fields)."""

    levels: int
    codebook_size: int
    kmeans_iters: int
    seed: int
    latent_dim: int
    hidden_dim: int
    steps: int
    batch_size: int
    learning_rate: float
    commitment: float

    @property
    def candidates(self) -> int | None:
        """Candidates per k-means++ pick (None: greedy k-means++'s default)."""
        ...


class RQVAE(eqx.Module):
    """Encoder MLP -> residual VQ over `levels` codebooks -> decoder MLP."""

    encoder: eqx.nn.MLP
    decoder: eqx.nn.MLP
    codebooks: Float[Array, "levels k latent"]

    @staticmethod
    def init(dim: int, hidden: int, latent: int, levels: int, k: int, *, key: PRNGKeyArray) -> RQVAE:
        """Random MLPs (two hidden layers each) and zero codebooks (set them with k-means before training)."""
        ke, kd = jax.random.split(key)
        return RQVAE(
            encoder=eqx.nn.MLP(dim, latent, hidden, depth=2, activation=jax.nn.gelu, key=ke),
            decoder=eqx.nn.MLP(latent, dim, hidden, depth=2, activation=jax.nn.gelu, key=kd),
            codebooks=jnp.zeros((levels, k, latent), jnp.float32),
        )

    def encode(self, x: Float[Array, "n dim"]) -> Float[Array, "n latent"]:
        return jax.vmap(self.encoder)(x)

    def quantize(
        self, z: Float[Array, "n latent"], commitment: float
    ) -> tuple[Float[Array, "n latent"], Int[Array, "n levels"], Float[Array, ""], Float[Array, "n latent"]]:
        """(straight-through quantized latent, codes, VQ loss, residual entering the last level)."""
        residual, zq, vq_loss, codes = z, jnp.zeros_like(z), 0.0, []
        before_last = z
        for book in self.codebooks:
            before_last = residual
            code = jnp.argmin(sq_distances(jax.lax.stop_gradient(residual), book), axis=1)
            c = book[code]
            vq_loss += jnp.mean(jnp.sum((jax.lax.stop_gradient(residual) - c) ** 2, axis=1))
            vq_loss += commitment * jnp.mean(jnp.sum((residual - jax.lax.stop_gradient(c)) ** 2, axis=1))
            c_st = residual + jax.lax.stop_gradient(c - residual)
            zq, residual = zq + c_st, residual - c_st
            codes.append(code)
        return zq, jnp.stack(codes, axis=1).astype(jnp.int32), vq_loss, before_last

    def decode_codes(self, codes: Int[Array, "n levels"]) -> Float[Array, "n dim"]:
        zq = sum(self.codebooks[level][codes[:, level]] for level in range(self.codebooks.shape[0]))
        return jax.vmap(self.decoder)(zq)


def loss_fn(model: RQVAE, x: Float[Array, "n dim"], commitment: float) -> Float[Array, ""]:
    """Reconstruction MSE (per item, summed over dims) plus the VQ loss."""
    zq, _, vq_loss, _ = model.quantize(model.encode(x), commitment)
    recon = jax.vmap(model.decoder)(zq)
    return jnp.mean(jnp.sum((recon - x) ** 2, axis=1)) + vq_loss


@eqx.filter_jit(donate="all-except-first")
def train_step(
    x: Float[Array, "n dim"],
    model: RQVAE,
    opt_state: optax.OptState,
    idx: Int[Array, " batch"],
    optim: optax.GradientTransformation,
    commitment: float,
) -> tuple[RQVAE, optax.OptState, Float[Array, ""]]:
    """One Adam step on the batch x[idx]."""
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x[idx], commitment)
    updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss


def train_rqvae(x: np.ndarray, cfg: RQVAESettings) -> tuple[RQVAE, list[float]]:
    """A trained RQ-VAE for `x` [items, dim] and its loss per step."""
    x = jnp.asarray(x, jnp.float32)
    key_model, key_kmeans, key_batches = jax.random.split(jax.random.key(cfg.seed), 3)
    model = RQVAE.init(x.shape[1], cfg.hidden_dim, cfg.latent_dim, cfg.levels, cfg.codebook_size, key=key_model)
    books, _, _ = residual_kmeans(
        model.encode(x),
        cfg.levels,
        cfg.codebook_size,
        iters=cfg.kmeans_iters,
        balanced=False,
        key=key_kmeans,
        candidates=cfg.candidates,
    )
    model = eqx.tree_at(lambda m: m.codebooks, model, jnp.stack(books))
    optim = optax.adam(cfg.learning_rate)
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    batch = min(cfg.batch_size, x.shape[0])
    losses = []
    for step in range(cfg.steps):
        idx = jax.random.choice(jax.random.fold_in(key_batches, step), x.shape[0], (batch,), replace=False)
        model, opt_state, loss = train_step(x, model, opt_state, idx, optim, cfg.commitment)
        losses.append(loss)
    return model, [float(v) for v in jax.device_get(losses)]


def rq_vae(x: np.ndarray, cfg: RQVAESettings) -> Quantized:
    """Train an RQ-VAE on `x` and quantize every item with it.

    The model sees `x` scaled to a mean squared row norm of 1: with Adam the codebooks move about one learning
    rate per step, so latents of a much larger scale would outrun them.
    """
    scale = float(np.sqrt(np.mean(np.sum(np.square(x, dtype=np.float64), axis=1)))) or 1.0
    model, _ = train_rqvae(x / scale, cfg)
    _, codes, _, before_last = model.quantize(model.encode(jnp.asarray(x / scale, jnp.float32)), cfg.commitment)
    return Quantized(
        codes=np.asarray(codes, np.int32),
        last_distances=np.asarray(sq_distances(before_last, model.codebooks[-1])),
        reconstruct=lambda c: scale * np.asarray(model.decode_codes(jnp.asarray(c[:, : cfg.levels]))),
    )
