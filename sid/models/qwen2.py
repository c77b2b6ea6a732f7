"""The Qwen2 decoder (Qwen2 / Qwen2.5) in Equinox: the model, its KV caches for generation, and vocab resizing.

Architecture as in HF `Qwen2ForCausalLM`: grouped-query attention with q/k/v biases and RoPE, RMSNorm, SwiGLU MLP,
an LM head tied to the embedding or not exactly as `ModelConfig.tie_word_embeddings` says. The decoder layers are
one `Qwen2Layer` whose arrays carry a leading [num_layers] axis and are run by `jax.lax.scan`.

Masking: every attention call goes through `dot_product_attention` (cuDNN fused attention on a GPU where it fits,
XLA otherwise) with a boolean mask built by one helper, `attention_mask`, from per-token segment ids and order
indices. That one rule covers causal training rows, packed rows (attention never crosses segments), left or right
padding (segment 0), and cached decoding.

Dropout (`ModelConfig.attention_dropout`, `residual_dropout`) applies only when `__call__` gets a PRNG key, i.e. in
training; each scanned layer gets its own keys. Attention dropout > 0 makes training attention take the explicit
`dropout_attention` path (same mask), since the fused kernels cannot drop probabilities.

Generation: `prefill` runs the (left-padded) prompts once and returns a `PrefixCache`; `decode` runs K continuations
("beams") per prompt one token at a time. The beams share the prompt's KV and each has a small `SuffixCache` slot
array, so beam search reorders beams by gathering only that small suffix (`SuffixCache.reorder`). Both return
hidden states: `logits` maps them to the whole vocab, `token_logprobs` to the log-probabilities of the few tokens a
trie allows, without gathering the head onto every device under a mesh.

Vocab: the embedding (and an untied head) may have more rows than real tokens (Qwen's checkpoint has 151,936 rows
for ~151.6k tokens; padding to a mesh-friendly multiple adds more). `valid_vocab` is the number of real tokens and
logits at ids >= valid_vocab are -inf, so those rows are never produced. `resize_vocab`, `pad_vocab` and
`unpad_vocab` change rows and `valid_vocab`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from sid.models.config import ModelConfig
from sid.models.layers import (
    DTYPES,
    Embedding,
    Linear,
    RMSNorm,
    apply_rope,
    check_scan_unroll,
    dropout,
    rope_cos_sin,
    scan_layers,
    vocab_logprobs,
)
from sid.parallel.rules import PartitionRules
from sid.parallel.trace import constrain_batch

SHARED_SEGMENT = -1
"""Segment id of keys visible to every query segment below `SEGMENTS_PER_PREFIX` (the prompt's KV during decoding,
a rollout's prompt before its completions)."""

SEGMENTS_PER_PREFIX = 1 << 16
"""A row may hold several shared prefixes: prefix j (0, 1, ...) is segment -(j + 1), and it is visible to the
query segments j * SEGMENTS_PER_PREFIX + 1 ... (j + 1) * SEGMENTS_PER_PREFIX - 1, its members (the RL stage's
packed rows: each prompt with its own completions, `sid.rl.rollout.group_rows`). Prefix 0 is `SHARED_SEGMENT`."""


def prefix_segments(prefix: int, members: int) -> tuple[int, range]:
    """(the segment id of shared prefix `prefix`, its `members` segment ids) for `attention_mask`."""
    if not 0 < members < SEGMENTS_PER_PREFIX:
        raise ValueError(f"a shared prefix has 1 to {SEGMENTS_PER_PREFIX - 1} member segments, not {members}")
    first = prefix * SEGMENTS_PER_PREFIX + 1
    return -(prefix + 1), range(first, first + members)


def attention_mask(
    q_segment: Int[Array, "batch q"],
    q_index: Int[Array, "batch q"],
    k_segment: Int[Array, "batch k"],
    k_index: Int[Array, "batch k"],
) -> Bool[Array, "batch 1 q k"]:
    """Which keys each query may attend to: a key is visible iff it is in the query's segment or in the shared
    prefix of the query's segment (`SEGMENTS_PER_PREFIX`: SHARED_SEGMENT for segments 1 ... 65535), and its order
    index is <= the query's (causal).

    Segment 0 is padding: its keys are visible only to padding queries, whose outputs are never used. Letting
    them see each other (rather than nothing) means no query row is fully masked, so no backend can produce a
    NaN there that would leak into gradients through a zero loss weight.
    """
    qs, qi = q_segment[:, :, None], q_index[:, :, None]
    ks, ki = k_segment[:, None, :], k_index[:, None, :]
    # A prefix query (qs < 0) gets 0 here, which no prefix key (ks < 0) equals: prefixes see only themselves.
    shared = (ks < 0) & (ks == -1 - qs // SEGMENTS_PER_PREFIX)
    return (((ks == qs) | shared) & (ki <= qi))[:, None]


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _cudnn_fits(q: Array) -> bool:
    """Whether cuDNN fused attention can take these queries: a GPU backend, 16-bit inputs, head_dim a multiple
    of 8 up to 128 (what jax's cuDNN path accepts for flash attention)."""
    head_dim = q.shape[-1]
    return jax.default_backend() == "gpu" and q.dtype in CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array, implementation: str) -> Array:
    """`jax.nn.dot_product_attention` with the `ModelConfig.attention` policy.

    auto: cuDNN fused attention where it fits (GPU, bf16/fp16, head_dim <= 128), else XLA. jax checks cuDNN's
    constraints while tracing, so a shape it refuses falls back to XLA here instead of failing the run.
    xla / cudnn: exactly that implementation (cudnn raises off-GPU).
    """
    if implementation == "auto":
        if _cudnn_fits(q):
            try:
                return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
            except (ValueError, NotImplementedError, RuntimeError):
                pass
        implementation = "xla"
    if implementation == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"attention='cudnn' needs a GPU backend, not {jax.default_backend()!r}; use 'auto'")
    if implementation not in ("xla", "cudnn"):
        raise ValueError(f"unknown attention implementation {implementation!r}: expected 'auto', 'xla' or 'cudnn'")
    with jax.numpy_dtype_promotion("standard"):  # jax's XLA path promotes bf16 logits with a float32 constant
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def dropout_attention(
    q: Float[Array, "batch q heads head_dim"],
    k: Float[Array, "batch k kv_heads head_dim"],
    v: Float[Array, "batch k kv_heads head_dim"],
    mask: Bool[Array, "batch 1 q k"],
    rate: float,
    key: PRNGKeyArray,
) -> Float[Array, "batch q heads head_dim"]:
    """Grouped-query attention spelled out (scores and softmax in float32) with inverted dropout on the
    probabilities, which the fused `dot_product_attention` cannot do. Probabilities are cast to the compute dtype
    before the dropout and the value matmul, as the fused path multiplies them in that dtype too."""
    b, t, heads, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, heads // kv_heads, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(mask[:, :, None], scores, -jnp.inf)  # `attention_mask` leaves no query row fully masked
    probs = dropout(jax.nn.softmax(scores, axis=-1).astype(v.dtype), rate, key)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, heads, d)


class Attention(eqx.Module):
    """Grouped-query self-attention with q/k/v biases and RoPE."""

    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)

    @staticmethod
    def init(cfg: ModelConfig, *, key: PRNGKeyArray) -> Attention:
        """From-scratch weights N(0, init_std), zero biases."""
        kq, kk, kv, ko = jax.random.split(key, 4)
        d, h, kvh, hd, std = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.init_std
        return Attention(
            q_proj=Linear.init(d, h * hd, bias=True, std=std, key=kq),
            k_proj=Linear.init(d, kvh * hd, bias=True, std=std, key=kk),
            v_proj=Linear.init(d, kvh * hd, bias=True, std=std, key=kv),
            o_proj=Linear.init(h * hd, d, bias=False, std=std, key=ko),
            num_heads=h,
            num_kv_heads=kvh,
            head_dim=hd,
        )

    def project(
        self,
        x: Float[Array, "batch seq embed"],
        cos: Float[Array, "batch seq half"],
        sin: Float[Array, "batch seq half"],
    ) -> tuple[Array, Array, Array]:
        """q [B,T,heads,head_dim] and k, v [B,T,kv_heads,head_dim], with RoPE applied to q and k."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class MLP(eqx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear

    @staticmethod
    def init(cfg: ModelConfig, *, key: PRNGKeyArray) -> MLP:
        """From-scratch weights N(0, init_std), no biases."""
        kg, ku, kd = jax.random.split(key, 3)
        d, f, std = cfg.hidden_size, cfg.intermediate_size, cfg.init_std
        return MLP(
            gate_proj=Linear.init(d, f, bias=False, std=std, key=kg),
            up_proj=Linear.init(d, f, bias=False, std=std, key=ku),
            down_proj=Linear.init(f, d, bias=False, std=std, key=kd),
        )

    def __call__(self, x: Float[Array, "... embed"]) -> Float[Array, "... embed"]:
        """Apply in the input's dtype."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


Attend = Callable[[Array, Array, Array], tuple[Array, object]]
"""(q, k, v) of one layer -> (attention output [B,T,heads,head_dim], what the layer scan should collect)."""


class Qwen2Layer(eqx.Module):
    """One pre-norm decoder layer; inside `Qwen2` every array has a leading [num_layers] axis."""

    attn_norm: RMSNorm
    attn: Attention
    mlp_norm: RMSNorm
    mlp: MLP

    @staticmethod
    def init(cfg: ModelConfig, *, key: PRNGKeyArray) -> Qwen2Layer:
        """From-scratch layer (unit norms)."""
        ka, km = jax.random.split(key)
        return Qwen2Layer(
            attn_norm=RMSNorm.init(cfg.hidden_size, cfg.rms_norm_eps),
            attn=Attention.init(cfg, key=ka),
            mlp_norm=RMSNorm.init(cfg.hidden_size, cfg.rms_norm_eps),
            mlp=MLP.init(cfg, key=km),
        )

    def __call__(
        self,
        x: Float[Array, "batch seq embed"],
        cos: Array,
        sin: Array,
        attend: Attend,
        *,
        residual_dropout: float = 0.0,
        key: PRNGKeyArray | None = None,
    ) -> tuple[Float[Array, "batch seq embed"], object]:
        """x + attn(norm(x)), then + mlp(norm(.)). `attend` decides which keys the queries see (and what
        cache to keep), so training, prefill and decoding share this one code path. With a key, both branch
        outputs go through dropout at `residual_dropout` before their residual add."""
        b, t, _ = x.shape
        k_attn, k_mlp = (None, None) if key is None else jax.random.split(key)
        q, k, v = self.attn.project(self.attn_norm(x), cos, sin)
        out, collected = attend(q, k, v)
        x = x + dropout(self.attn.o_proj(out.reshape(b, t, -1)), residual_dropout, k_attn)
        return x + dropout(self.mlp(self.mlp_norm(x)), residual_dropout, k_mlp), collected


class PrefixCache(eqx.Module):
    """The prompts' keys/values for every layer, shared by all beams of a prompt."""

    k: Float[Array, "layers batch seq kv_heads head_dim"]
    v: Float[Array, "layers batch seq kv_heads head_dim"]
    mask: Bool[Array, "batch seq"]
    """False at (left) padding."""


class SuffixCache(eqx.Module):
    """Each beam's own generated keys/values: slot j holds the j-th generated token; `length` slots are filled."""

    k: Float[Array, "layers batch beams max_new kv_heads head_dim"]
    v: Float[Array, "layers batch beams max_new kv_heads head_dim"]
    length: Int[Array, ""]

    def reorder(self, beam_idx: Int[Array, "batch beams"]) -> SuffixCache:
        """Beam k of prompt b continues beam `beam_idx[b, k]` (a gather along the beams axis)."""
        idx = beam_idx[None, :, :, None, None, None]
        return SuffixCache(
            jnp.take_along_axis(self.k, idx, axis=2), jnp.take_along_axis(self.v, idx, axis=2), self.length
        )


def _resolve_config(cfg: ModelConfig) -> ModelConfig:
    """Check sizes and fill derived fields (head_dim) so the model's static config holds real sizes."""
    if cfg.vocab_size <= 0:
        raise ValueError("ModelConfig.vocab_size must be set (> 0) before building a Qwen2 from scratch")
    if cfg.num_heads % cfg.num_kv_heads:
        raise ValueError(f"num_heads={cfg.num_heads} must be a multiple of num_kv_heads={cfg.num_kv_heads}")
    head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for RoPE")
    check_scan_unroll(cfg.scan_unroll)
    for name in ("attention_dropout", "residual_dropout"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"model.{name} must be in [0, 1), got {getattr(cfg, name)!r}")
    return dataclasses.replace(cfg, head_dim=head_dim)


class Qwen2(eqx.Module):
    """Qwen2 causal LM: `__call__` gives final hidden states, `logits` maps them to the vocab (and
    `token_logprobs` to the log-probabilities of a few tokens)."""

    embed: Embedding
    layers: Qwen2Layer
    final_norm: RMSNorm
    lm_head: Linear | None
    """None when the head is tied to `embed`."""
    config: ModelConfig = eqx.field(static=True)
    """Real sizes: vocab_size = embedding rows, head_dim resolved."""
    valid_vocab: int = eqx.field(static=True)
    """Real tokens; logits at ids >= valid_vocab are -inf."""
    partition_rules: ClassVar[PartitionRules] = PartitionRules(
        column=frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}),
        row=frozenset({"o_proj", "down_proj"}),
        vocab=frozenset({"embed", "lm_head"}),
    )
    """tp splits attention heads and MLP width (sid.parallel.rules)."""

    def __check_init__(self):
        rows = self.embed.weight.shape[0]
        if not 0 < self.valid_vocab <= rows or rows != self.config.vocab_size:
            raise ValueError(
                f"valid_vocab={self.valid_vocab} must be in (0, rows={rows}] and config.vocab_size="
                f"{self.config.vocab_size} must equal the embedding rows"
            )
        if (self.lm_head is None) != self.config.tie_word_embeddings:
            raise ValueError("lm_head must be None exactly when config.tie_word_embeddings is set")

    @staticmethod
    def init(cfg: ModelConfig, *, key: PRNGKeyArray) -> Qwen2:
        """From scratch: weights N(0, init_std), zero biases, unit norms; all cfg.vocab_size rows valid."""
        cfg = _resolve_config(cfg)
        ke, kl, kh = jax.random.split(key, 3)
        layers = eqx.filter_vmap(lambda k: Qwen2Layer.init(cfg, key=k))(jax.random.split(kl, cfg.num_layers))
        head = None
        if not cfg.tie_word_embeddings:
            head = Linear.init(cfg.hidden_size, cfg.vocab_size, bias=False, std=cfg.init_std, key=kh)
        return Qwen2(
            embed=Embedding.init(cfg.vocab_size, cfg.hidden_size, std=cfg.init_std, key=ke),
            layers=layers,
            final_norm=RMSNorm.init(cfg.hidden_size, cfg.rms_norm_eps),
            lm_head=head,
            config=cfg,
            valid_vocab=cfg.vocab_size,
        )

    def _attend(self, q: Array, k: Array, v: Array, mask: Array, key: PRNGKeyArray | None = None) -> Array:
        """Attention per `config.attention`; with a key and attention_dropout > 0, the explicit path that drops
        probabilities (`dropout_attention`)."""
        if key is not None and self.config.attention_dropout > 0.0:
            return dropout_attention(q, k, v, mask, self.config.attention_dropout, key)
        return dot_product_attention(q, k, v, mask, self.config.attention)

    def _trunk(
        self, input_ids: Array, positions: Array, attend, xs, remat: str, key: PRNGKeyArray | None = None
    ) -> tuple[Array, object]:
        """Embed, run the scanned layers with `attend(layer_xs, q, k, v, attention_key)`, final norm. With a key,
        each layer gets its own keys (split here, scanned with `xs`) for attention and residual dropout."""
        cfg = self.config
        x = self.embed(input_ids, DTYPES[cfg.compute_dtype])
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)
        layer_keys = None if key is None else jax.random.split(key, cfg.num_layers)

        def body(layer: Qwen2Layer, x: Array, inputs) -> tuple[Array, object]:
            layer_xs, layer_key = inputs
            k_attn, k_residual = (None, None) if layer_key is None else jax.random.split(layer_key)
            x, collected = layer(
                x,
                cos,
                sin,
                lambda q, k, v: attend(layer_xs, q, k, v, k_attn),
                residual_dropout=cfg.residual_dropout,
                key=k_residual,
            )
            return constrain_batch(x), collected

        x, collected = scan_layers(body, x, self.layers, (xs, layer_keys), remat=remat, unroll=cfg.scan_unroll)
        return self.final_norm(x), collected

    def __call__(
        self,
        input_ids: Int[Array, "batch seq"],
        positions: Int[Array, "batch seq"],
        segment_ids: Int[Array, "batch seq"],
        *,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "batch seq embed"]:
        """Hidden states after the final norm (compute dtype). Causal attention within equal segment ids;
        segment 0 is padding. Positions are per token (restart per packed sample; skip left padding). With a
        `key` (training), attention and residual dropout apply at the config's rates; without one, none does."""
        order = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        mask = attention_mask(segment_ids, order, segment_ids, order)
        if not (self.config.attention_dropout or self.config.residual_dropout):
            key = None  # nothing to drop: no random bits drawn
        hidden, _ = self._trunk(
            input_ids,
            positions,
            lambda _, q, k, v, k_attn: (self._attend(q, k, v, mask, k_attn), None),
            None,
            self.config.remat,
            key,
        )
        return hidden

    def head_weight(self) -> Float[Array, "vocab embed"]:
        """The LM head matrix [V, D]: the embedding when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def logits(self, hidden: Float[Array, "... embed"]) -> Float[Array, "... vocab"]:
        """float32 logits, -inf at ids >= valid_vocab (padding and unused rows are never produced).

        Under a mesh the logits stay split by batch over (dp, fsdp) like the hidden states, which gathers the whole
        head onto every device (`token_logprobs` does not): left to itself, XLA 0.11's Shardy partitioner splits
        this matmul's batch over dp only (the fsdp axis goes to the vocab rows of the head) and then fails a check
        when resharding the hidden states (dp > 1 crashed)."""
        w = self.head_weight().astype(hidden.dtype)
        out = jnp.einsum("...d,vd->...v", constrain_batch(hidden), w, preferred_element_type=jnp.float32)
        out = constrain_batch(out)
        if self.valid_vocab < out.shape[-1]:
            out = jnp.where(jnp.arange(out.shape[-1]) < self.valid_vocab, out, -jnp.inf)
        return out

    def token_logprobs(self, hidden: Float[Array, "batch *rest embed"], tokens: Int[Array, " n"]) -> Array:
        """float32 log-probabilities (log-softmax over the valid vocab) of `tokens` only: [batch, *rest, n].
        Under a mesh no device gathers the head (`sid.models.layers.vocab_logprobs`), as beam search needs."""
        return vocab_logprobs(hidden, self.head_weight(), tokens, valid_vocab=self.valid_vocab)

    def prefill(
        self, input_ids: Int[Array, "batch seq"], positions: Int[Array, "batch seq"], mask: Bool[Array, "batch seq"]
    ) -> tuple[Float[Array, "batch embed"], PrefixCache]:
        """Run left-padded prompts (mask False on pads); return the hidden state at the last position L-1 of every
        row (`logits` or `token_logprobs` map it to the vocab) and the prompts' KV cache."""
        segments = mask.astype(jnp.int32)
        order = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        attn_mask = attention_mask(segments, order, segments, order)
        hidden, (k, v) = self._trunk(
            input_ids, positions, lambda _, q, k, v, __: (self._attend(q, k, v, attn_mask), (k, v)), None, "none"
        )
        return hidden[:, -1], PrefixCache(k, v, mask)

    def init_suffix_cache(self, batch: int, num_beams: int, max_new: int) -> SuffixCache:
        """An empty suffix cache for `num_beams` continuations of up to `max_new` tokens per prompt."""
        cfg = self.config
        shape = (cfg.num_layers, batch, num_beams, max_new, cfg.num_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, DTYPES[cfg.compute_dtype])
        return SuffixCache(zeros, zeros, jnp.zeros((), jnp.int32))

    def decode(
        self,
        tokens: Int[Array, "batch beams"],
        positions: Int[Array, "batch beams"],
        prefix: PrefixCache,
        suffix: SuffixCache,
    ) -> tuple[Float[Array, "batch beams embed"], SuffixCache]:
        """One generation step for K beams per prompt: write each beam's token KV at slot `suffix.length` and
        attend to the prompt's KV plus the beam's own earlier slots. Returns the hidden states (for `logits` or
        `token_logprobs`) and the cache with length + 1. `positions` are each token's position id (the prompt's
        real length + step)."""
        b, num_beams = tokens.shape
        max_new, slot = suffix.k.shape[3], suffix.length
        # Queries are the K beams (query axis = beams); keys are the prompt (shared) then every beam's slots
        # flattened (beam-major). Beam k sees the prompt and its own slots <= the current one.
        beam_seg = jnp.broadcast_to(jnp.arange(1, num_beams + 1, dtype=jnp.int32), (b, num_beams))
        prompt_seg = jnp.where(prefix.mask, SHARED_SEGMENT, 0).astype(jnp.int32)
        slot_seg = jnp.broadcast_to(jnp.repeat(beam_seg[0], max_new), (b, num_beams * max_new))
        prompt_idx = jnp.zeros_like(prompt_seg)
        slot_idx = jnp.broadcast_to(jnp.tile(jnp.arange(max_new, dtype=jnp.int32), num_beams), slot_seg.shape)
        mask = attention_mask(
            beam_seg,
            jnp.full((b, num_beams), slot, jnp.int32),
            jnp.concatenate([prompt_seg, slot_seg], axis=1),
            jnp.concatenate([prompt_idx, slot_idx], axis=1),
        )

        def attend(layer_xs, q, k, v, _):
            pk, pv, sk, sv = layer_xs
            sk = jax.lax.dynamic_update_slice_in_dim(sk, k[:, :, None].astype(sk.dtype), slot, axis=2)
            sv = jax.lax.dynamic_update_slice_in_dim(sv, v[:, :, None].astype(sv.dtype), slot, axis=2)
            keys = jnp.concatenate([pk, sk.reshape(b, num_beams * max_new, *sk.shape[3:])], axis=1)
            values = jnp.concatenate([pv, sv.reshape(b, num_beams * max_new, *sv.shape[3:])], axis=1)
            return self._attend(q, keys.astype(q.dtype), values.astype(q.dtype), mask), (sk, sv)

        hidden, (sk, sv) = self._trunk(tokens, positions, attend, (prefix.k, prefix.v, suffix.k, suffix.v), "none")
        return hidden, SuffixCache(sk, sv, slot + 1)


def _with_vocab(model: Qwen2, embed: Array, head: Array | None, valid_vocab: int) -> Qwen2:
    """The same model with new embedding/head rows and valid_vocab (config.vocab_size follows the rows)."""
    return Qwen2(
        embed=Embedding(embed),
        layers=model.layers,
        final_norm=model.final_norm,
        lm_head=None if head is None else Linear(head, None),
        config=dataclasses.replace(model.config, vocab_size=embed.shape[0]),
        valid_vocab=valid_vocab,
    )


def _heads(model: Qwen2) -> list[Array]:
    return [model.embed.weight] + ([] if model.lm_head is None else [model.lm_head.weight])


def resize_vocab(
    model: Qwen2, num_tokens: int, *, num_existing: int | None = None, key: PRNGKeyArray | None = None
) -> Qwen2:
    """Make ids [0, num_tokens) the real vocabulary (valid_vocab = num_tokens), e.g. the base tokenizer plus SID
    tokens.

    Ids [0, num_existing) are trained tokens and keep their rows (default: the current valid_vocab). Every id in
    [num_existing, num_tokens) is a new token whose embedding (and untied head) row is initialised per
    `config.new_token_init`: 'mean' = the mean of the existing tokens' rows, 'normal' = N(0, init_std) drawn with
    `key` (default: PRNGKey(config.seed)). This includes ids that land on rows the checkpoint already has but no
    token used (Qwen's 151,936 rows vs its ~151.6k tokens), so every new token starts alike. Rows are added only
    when num_tokens exceeds them; spare rows beyond num_tokens are kept and masked.
    """
    num_existing = model.valid_vocab if num_existing is None else num_existing
    rows = model.embed.weight.shape[0]
    if not 0 < num_existing <= min(rows, num_tokens):
        raise ValueError(f"need 0 < num_existing={num_existing} <= min(rows={rows}, num_tokens={num_tokens})")
    cfg = model.config
    key = jax.random.key(cfg.seed) if key is None else key
    new_rows = num_tokens - num_existing
    out = []
    for w, k in zip(_heads(model), jax.random.split(key, 2), strict=False):
        w = jnp.concatenate([w, jnp.zeros((max(num_tokens - rows, 0), w.shape[1]), w.dtype)])
        if cfg.new_token_init == "mean":
            init = jnp.broadcast_to(jnp.mean(w[:num_existing], axis=0), (new_rows, w.shape[1]))
        elif cfg.new_token_init == "normal":
            init = cfg.init_std * jax.random.normal(k, (new_rows, w.shape[1]), w.dtype)
        else:
            raise ValueError(f"unknown new_token_init {cfg.new_token_init!r}: expected 'mean' or 'normal'")
        out.append(w.at[num_existing:num_tokens].set(init))
    return _with_vocab(model, out[0], out[1] if len(out) > 1 else None, num_tokens)


def pad_vocab(model: Qwen2, multiple: int) -> Qwen2:
    """Add zero rows so the row count is a multiple of `multiple` (e.g. the mesh's vocab sharding); valid_vocab
    is unchanged, so the padded ids are never produced."""
    if multiple < 1:
        raise ValueError(f"vocab multiple must be >= 1, got {multiple}")
    rows = model.embed.weight.shape[0]
    extra = -rows % multiple
    out = [jnp.concatenate([w, jnp.zeros((extra, w.shape[1]), w.dtype)]) for w in _heads(model)]
    return _with_vocab(model, out[0], out[1] if len(out) > 1 else None, model.valid_vocab)


def unpad_vocab(model: Qwen2) -> Qwen2:
    """Drop every row at ids >= valid_vocab (padding and unused rows), e.g. before padding to another multiple."""
    out = [w[: model.valid_vocab] for w in _heads(model)]
    return _with_vocab(model, out[0], out[1] if len(out) > 1 else None, model.valid_vocab)
