"""Trie-constrained beam search over a Qwen2 decoder: one jitted program per prompt-length bucket.

Upstream ranks with HF `generate` and a Python `prefix_allowed_tokens_fn`; here the whole search is one XLA program:
a prefill over the left-padded prompts, then one KV-cached decode step per SID level, each followed by an exact
top-K over (beams x allowed tokens). Scores are true model log-probabilities (log-softmax in f32 over the full
vocab); tokens the trie does not allow score -inf, so a beam can never leave the catalog, and beams that have no
allowed continuation (e.g. 50 beams but 48 first-level codes) stay at -inf and come back flagged invalid instead
of being filled with unconstrained tokens. After the last SID token the completion is forced through the trie's
end tokens ("\\n" then EOS, as upstream trains "{SID}\\n" + EOS) whose log-probs are added before the final sort,
i.e. length_penalty 0. Ties break deterministically: lower beam index, then lower token id.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from sid.eval.trie import TrieTables
from sid.models.qwen2 import Qwen2
from sid.parallel.mesh import batch_sharding
from sid.parallel.rules import param_shardings
from sid.parallel.trace import traced_on


class BeamOutput(NamedTuple):
    """The K best completions of each prompt, best first."""

    tokens: Int[Array, "batch beams depth"]
    """SID token ids; -1 on invalid beams."""
    scores: Float[Array, "batch beams"]
    """Sum of the log-probs of the SID tokens and the end tokens; -inf on invalid beams."""
    valid: Bool[Array, "batch beams"]
    """False for beams that have no catalog SID left to take (only when fewer than K SIDs exist)."""
    leaves: Int[Array, "batch beams"]
    """Trie leaf of each beam (``SidTrie.sids[leaf]``, ``SidTrie.leaf_items[leaf]``); -1 on invalid beams."""


def beam_search(
    model: Qwen2,
    trie: TrieTables,
    input_ids: Int[Array, "batch length"],
    mask: Bool[Array, "batch length"],
    *,
    num_beams: int,
) -> BeamOutput:
    """Constrained beam search for every prompt of a left-padded batch (``mask`` False on the pads).

    Positions are per sample (``cumsum(mask) - 1``); step t feeds each beam's token at position
    ``prompt_length + t``. A row without any real token (e.g. filler to complete a sharded batch) gives meaningless
    beams: drop its results. ``num_beams`` is static (one compilation per value and prompt length).
    """
    batch, _ = input_ids.shape
    k, steps, width = num_beams, trie.num_steps, trie.codes.shape[1]
    mask = mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1, 0)
    prompt_len = jnp.sum(mask, axis=1, dtype=jnp.int32)
    last_hidden, prefix = model.prefill(input_ids, positions, mask)
    # Every token but the last end token is fed back: depth SID tokens + all end tokens but EOS.
    suffix = model.init_suffix_cache(batch, k, steps - 1)

    def select(t, score, node, cand, seq):
        """Top-K over (beam, allowed token), flattened beam-major so ties go to the lower beam, then token."""
        child = trie.children[node]
        total = jnp.where(child >= 0, score[..., None] + cand, -jnp.inf).reshape(batch, k * width)
        score, flat = jax.lax.top_k(total, k)
        parent = flat // width
        token = trie.codes[t][flat % width]
        node = jnp.maximum(jnp.take_along_axis(child.reshape(batch, k * width), flat, axis=1), 0)
        seq = jnp.take_along_axis(seq, parent[..., None], axis=1).at[:, :, t].set(token)
        return score, node, seq, parent

    def step(carry, t):
        score, node, cand, seq, suffix = carry
        score, node, seq, parent = select(t, score, node, cand, seq)
        hidden, suffix = model.decode(seq[:, :, t], prompt_len[:, None] + t, prefix, suffix.reorder(parent))
        cand = model.token_logprobs(hidden, trie.codes[t + 1])
        return (score, node, cand, seq, suffix), None

    # Only beam 0 is live at the start, so step 0 expands the prompt once instead of K identical times.
    score = jnp.full((batch, k), -jnp.inf, jnp.float32).at[:, 0].set(0.0)
    node = jnp.zeros((batch, k), jnp.int32)
    cand = jnp.broadcast_to(model.token_logprobs(last_hidden[:, None, :], trie.codes[0]), (batch, k, width))
    seq = jnp.zeros((batch, k, steps), jnp.int32)
    (score, node, cand, seq, _), _ = jax.lax.scan(
        step, (score, node, cand, seq, suffix), jnp.arange(steps - 1, dtype=jnp.int32)
    )
    score, node, seq, _ = select(steps - 1, score, node, cand, seq)
    valid = score > -jnp.inf
    return BeamOutput(
        tokens=jnp.where(valid[..., None], seq[:, :, : trie.depth], -1),
        scores=score,
        valid=valid,
        leaves=jnp.where(valid, node - trie.leaf_offset, -1),
    )


def sharded_beam_search(mesh: Mesh, model: Qwen2, *, num_beams: int):
    """``jax.jit(beam_search)`` for ``fn(model, trie, input_ids, mask)``: the prompt batch split over the mesh's
    data axes (its size must divide evenly), params sharded by ``param_shardings`` (pass the model placed that
    way, as the trainer and checkpoint restore do), the trie replicated. ``model`` only supplies the tree structure.
    """
    batch = batch_sharding(mesh)
    return jax.jit(
        traced_on(mesh, functools.partial(beam_search, num_beams=num_beams)),
        in_shardings=(param_shardings(model, mesh), NamedSharding(mesh, PartitionSpec()), batch, batch),
        out_shardings=batch,
    )
