"""The `python -m sid.index` job: where the items are, how they are embedded, quantized and written."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from sid.index.collisions import Fix
from sid.index.residual import Quantized


@dataclass(frozen=True)
class EmbedConfig:
    """Item embeddings: collaborative (from the training interactions), text (a local HF Qwen2) or a .npy file."""

    source: Literal["collaborative", "text", "npy"] = "collaborative"
    """collaborative: SVD of the item co-occurrence PPMI matrix; text: mean-pooled Qwen2 hidden states of title +
    description; npy: a [items, dim] float array, row i for the i-th item id in ascending order."""
    dim: int = 64
    """collaborative: SVD rank (the embedding width)."""
    expected_dim: int = 0
    """npy/text: the width every row must have (0: any)."""
    window: int = 5
    """collaborative: a target co-occurs with this many history items just before it."""
    seed: int = 0
    """collaborative: seed of the randomized SVD's sketch."""
    npy_path: str = ""
    """npy: the embedding file."""
    model_dir: str = ""
    """text: a local HF Qwen2 directory (config.json, *.safetensors, tokenizer files)."""
    max_tokens: int = 128
    """text: tokens per item text (longer texts are cut at the end)."""
    batch_size: int = 64
    """text: items per forward pass."""
    compute_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """text: the model's compute dtype (pooling is always f32)."""

    def __post_init__(self):
        if self.dim < 1 or self.expected_dim < 0 or self.window < 1 or self.max_tokens < 1 or self.batch_size < 1:
            raise ValueError("embed.expected_dim must be >= 0 and dim, window, max_tokens, batch_size >= 1")


@dataclass(frozen=True)
class QuantizerConfig:
    """Residual quantization of the embeddings into `levels` codes per item."""

    kind: Literal["rq_kmeans", "rq_vae"] = "rq_kmeans"
    """rq_kmeans: residual k-means on the embeddings; rq_vae: an MLP autoencoder with residual VQ in between."""
    levels: int = 3
    """Codes per SID (before any collision level)."""
    codebook_size: int = 256
    """Codes per level."""
    kmeans_iters: int = 50
    """Lloyd iterations per level (also for the RQ-VAE's k-means init)."""
    seeding_candidates: int = 0
    """Candidates per k-means++ pick, the one that lowers the k-means objective most kept (also for the RQ-VAE's
    k-means init). 0: 2 + floor(ln codebook_size) (greedy k-means++, 7 for 256 codes); 1: plain k-means++, the
    seeding before greedy became the default (it rebuilds the SIDs of that time for a seed)."""
    balanced: bool = False
    """Cap every code at ceil(items / codebook_size) items so each codebook is used evenly."""
    collisions: Fix = "reassign"
    """reassign: colliding items move to their nearest free last-level code (levels unchanged); extra_level: a
    final level numbers the items of each shared SID."""
    seed: int = 0
    """Seed of the k-means++ draws and the RQ-VAE's init and batches."""
    latent_dim: int = 32
    """rq_vae: width of the quantized latent."""
    hidden_dim: int = 256
    """rq_vae: width of the encoder's and decoder's hidden layers."""
    steps: int = 2000
    """rq_vae: training steps."""
    batch_size: int = 1024
    """rq_vae: items per step."""
    learning_rate: float = 1e-3
    """rq_vae: Adam learning rate."""
    commitment: float = 0.25
    """rq_vae: weight of the commitment loss ||r - sg(c)||^2."""

    def __post_init__(self):
        if self.levels < 1 or self.codebook_size < 2 or self.kmeans_iters < 1 or self.steps < 1:
            raise ValueError("quantizer.levels >= 1, codebook_size >= 2, kmeans_iters >= 1 and steps >= 1")
        if self.seeding_candidates < 0:
            raise ValueError("quantizer.seeding_candidates must be >= 0 (0: 2 + floor(ln codebook_size))")

    @property
    def candidates(self) -> int | None:
        """`seeding_candidates` as k-means takes it: None for the greedy default."""
        return self.seeding_candidates or None

    def build(self) -> Callable[[np.ndarray], Quantized]:
        """embeddings [items, dim] -> Quantized."""
        if self.kind == "rq_vae":
            from sid.index.rqvae import rq_vae

            return functools.partial(rq_vae, cfg=self)
        from sid.index.residual import rq_kmeans

        return functools.partial(
            rq_kmeans,
            levels=self.levels,
            k=self.codebook_size,
            iters=self.kmeans_iters,
            balanced=self.balanced,
            seed=self.seed,
            candidates=self.candidates,
        )


@dataclass(frozen=True)
class OutputConfig:
    """Where the built dataset goes."""

    dir: str = "runs/sids"
    """Output directory (never the data directory): the index, the report, and the dataset files beside it."""
    dataset_files: bool = True
    """Also write what the readers need beside the index: LETTER's inter.json; MiniOneRec's item.json, info.txt
    and every split CSV with its SID columns rewritten."""
