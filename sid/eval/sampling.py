"""Trie-constrained sampling with temperature over a Qwen2 decoder: G independent completions per prompt, jitted.

The same machinery as beam search (`sid.eval.beam`): one prefill over the left-padded prompts, then one KV-cached
decode step per SID level for the G samples of each prompt (the suffix cache holds them as G "beams" that are never
reordered). At each step a sample draws among the tokens its trie node allows, from the model's softmax with
temperature renormalised over those tokens (the others are -inf before the softmax), as upstream's
``TemperatureLogitsWarper`` then constrained logits processor then multinomial sampling. Every trie node has at
least one child, so a sample can never leave the catalog; the end tokens ("\\n" then EOS) have one candidate each
and are therefore forced. Unlike beams, samples of one prompt may repeat a SID.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from sid.eval.trie import TrieTables
from sid.models.qwen2 import Qwen2
from sid.parallel.mesh import batch_sharding
from sid.parallel.rules import param_shardings
from sid.parallel.trace import traced_on


class SampleOutput(NamedTuple):
    """G sampled completions per prompt, in draw order."""

    tokens: Int[Array, "batch samples depth"]
    """SID token ids."""
    scores: Float[Array, "batch samples"]
    """Sum of the model's log-probs (temperature 1, full vocab, as beam scores) of the SID and end tokens."""
    leaves: Int[Array, "batch samples"]
    """Trie leaf of each sample (``SidTrie.sids[leaf]``, ``SidTrie.leaf_items[leaf]``)."""


def constrained_sample(
    model: Qwen2,
    trie: TrieTables,
    input_ids: Int[Array, "batch length"],
    mask: Bool[Array, "batch length"],
    key: PRNGKeyArray,
    *,
    num_samples: int,
    temperature: float,
) -> SampleOutput:
    """Sample ``num_samples`` catalog SIDs for every prompt of a left-padded batch (``mask`` False on the pads).

    ``num_samples`` and ``temperature`` are static (one compilation per value; a run keeps both fixed).
    ``temperature`` must be > 0; small values approach greedy decoding (beam search with one beam). Draws depend
    on ``key`` and on the batch's shape and row order.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch, _ = input_ids.shape
    g, steps = num_samples, trie.num_steps
    mask = mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    prompt_len = jnp.sum(mask, axis=1, dtype=jnp.int32)
    last_hidden, prefix = model.prefill(input_ids, positions, mask)
    suffix = model.init_suffix_cache(batch, g, steps - 1)

    def draw(t, node, cand):
        """One token per sample among its node's children; its log-prob; the child node."""
        child = trie.children[node]
        logits = jnp.where(child >= 0, cand / temperature, -jnp.inf)
        col = jax.random.categorical(jax.random.fold_in(key, t), logits, axis=-1)[..., None]
        pick = functools.partial(jnp.take_along_axis, indices=col, axis=-1)
        return trie.codes[t][col[..., 0]], pick(cand)[..., 0], pick(child)[..., 0]

    def step(carry, t):
        score, node, cand, seq, suffix = carry
        token, logp, node = draw(t, node, cand)
        hidden, suffix = model.decode(token, prompt_len[:, None] + t, prefix, suffix)
        cand = model.token_logprobs(hidden, trie.codes[t + 1])
        return (score + logp, node, cand, seq.at[:, :, t].set(token), suffix), None

    score = jnp.zeros((batch, g), jnp.float32)
    node = jnp.zeros((batch, g), jnp.int32)
    width = trie.codes.shape[1]
    cand = jnp.broadcast_to(model.token_logprobs(last_hidden[:, None, :], trie.codes[0]), (batch, g, width))
    seq = jnp.zeros((batch, g, steps), jnp.int32)
    (score, node, cand, seq, _), _ = jax.lax.scan(
        step, (score, node, cand, seq, suffix), jnp.arange(steps - 1, dtype=jnp.int32)
    )
    _, logp, node = draw(steps - 1, node, cand)
    return SampleOutput(tokens=seq[:, :, : trie.depth], scores=score + logp, leaves=node - trie.leaf_offset)


def sharded_constrained_sample(mesh: Mesh, model: Qwen2, *, num_samples: int, temperature: float):
    """``jax.jit(constrained_sample)`` for ``fn(model, trie, input_ids, mask, key)``: prompts split over the mesh's
    data axes (the batch must divide evenly), params sharded by ``param_shardings``, the trie and the key
    replicated. ``model`` only supplies the tree structure."""
    batch, replicated = batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
    sample = functools.partial(constrained_sample, num_samples=num_samples, temperature=temperature)
    return jax.jit(
        traced_on(mesh, sample),
        in_shardings=(param_shardings(model, mesh), replicated, batch, batch, replicated),
        out_shardings=batch,
    )
