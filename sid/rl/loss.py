"""The GRPO loss family on completion tokens, and the per-token log-probs it needs from a Qwen2 policy.

Per completion token, with A the group advantage of its completion and the k3 estimator of KL(policy || ref):

    ratio = exp(logp - old),  KL = exp(ref - logp) - (ref - logp) - 1,  loss_t = -(ratio * A - beta * KL)

Upstream (MiniOneRec ``minionerec_trainer.py``) makes one update per rollout, so ``old = stop_gradient(logp)``:
the ratio is 1 in value and only its gradient, ``A * d(logp)``, matters (``old_logp=None`` here). With stored
``old_logp`` and ``clip_eps`` the surrogate is PPO's ``min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)``; upstream
never clips, and with ``old_logp=None`` clipping changes neither the value nor the gradient (ratio 1 is inside).

Reductions (``kind``), as upstream's three branches:

- ``grpo``: mean over each completion's tokens, then over completions (upstream's default);
- ``token_mean``: mean over all completion tokens of the batch (upstream's ``dapo``);
- ``sequence``: one ratio per completion, the geometric mean of its token ratios, ``exp(mean_t(logp - old))``,
  and the completion's mean token KL: ``-(ratio * A - beta * KL)`` averaged over completions (upstream's ``gspo``;
  upstream does not clip it; ``clip_eps`` clips this sequence ratio, as the GSPO paper does).

`grpo_loss` returns the loss as (sum, count, additive stats), the contract of `sid.step.LossFn`: the loss is
sum / count, and summing both over micro-batches keeps each reduction exact under gradient accumulation.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sid.models.qwen2 import Qwen2

LOSS_KINDS = ("grpo", "token_mean", "sequence")


def k3_kl(logp: Float[Array, "*s"], ref_logp: Float[Array, "*s"]) -> Float[Array, "*s"]:
    """The k3 estimator of KL(policy || ref) per sampled token: >= 0, and 0 where the two log-probs agree."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def _surrogate(ratio: Array, adv: Array, clip_eps: float | None) -> tuple[Array, Array]:
    """(PPO's clipped surrogate, or ratio * A without clipping; where the clipped term was the smaller one)."""
    unclipped = ratio * adv
    if clip_eps is None:
        return unclipped, jnp.zeros(unclipped.shape, bool)
    clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    return jnp.minimum(unclipped, clipped), clipped < unclipped


def grpo_loss(
    logp: Float[Array, "batch tokens"],
    ref_logp: Float[Array, "batch tokens"],
    old_logp: Float[Array, "batch tokens"] | None,
    mask: Bool[Array, "batch tokens"],
    advantages: Float[Array, " batch"],
    *,
    beta: float,
    kind: str = "grpo",
    clip_eps: float | None = None,
) -> tuple[Float[Array, ""], Int[Array, ""], dict[str, Array]]:
    """The policy-gradient loss of a batch of completions (one row each) as (loss sum, count, stats).

    ``logp`` are the policy's log-probs of the completion tokens (differentiated), ``ref_logp`` the reference
    model's, ``old_logp`` the rollout policy's (None: one update per rollout, as upstream), ``mask`` True on the
    completion tokens. Rows without any completion token (filler to complete a sharded batch) are left out of the
    loss, its gradient, the count and the stats, whatever their log-probs and advantages. Stats are sums over the
    batch: ``kl_sum`` (each completion's mean token KL, summed), ``completions``, ``tokens``, ``ratio_sum`` /
    ``ratio_units`` (importance ratios over tokens, or over completions for ``sequence``) and ``clipped`` (units
    whose clipped term was taken).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown GRPO loss kind {kind!r}: expected one of {LOSS_KINDS}")
    mask = mask.astype(bool)
    rows = mask.any(axis=1)

    def masked(x: Array) -> Array:  # masked positions may hold -inf or garbage: keep them out of exp()
        return jnp.where(mask, x.astype(jnp.float32), 0.0)

    logp, ref_logp = masked(logp), masked(ref_logp)
    old = jax.lax.stop_gradient(logp) if old_logp is None else masked(old_logp)
    m = mask.astype(jnp.float32)
    length = jnp.maximum(m.sum(axis=1), 1.0)

    def completion_mean(x: Array) -> Array:
        return (x * m).sum(axis=1) / length

    kl = k3_kl(logp, ref_logp)
    adv = jnp.where(rows, advantages.astype(jnp.float32), 0.0)
    completions, tokens = rows.sum(dtype=jnp.int32), mask.sum(dtype=jnp.int32)
    if kind == "sequence":
        ratio = jnp.exp(completion_mean(logp - old))
        surrogate, took_clip = _surrogate(ratio, adv, clip_eps)
        loss_sum, count = -(surrogate - beta * completion_mean(kl)).sum(), completions
        ratio_sum, ratio_units, clipped = (
            jnp.where(rows, ratio, 0.0).sum(),
            completions,
            (took_clip & rows).sum(dtype=jnp.int32),
        )
    else:
        ratio = jnp.exp(logp - old)
        surrogate, took_clip = _surrogate(ratio, adv[:, None], clip_eps)
        per_token = -(surrogate - beta * kl)
        if kind == "grpo":
            loss_sum, count = completion_mean(per_token).sum(), completions
        else:
            loss_sum, count = (per_token * m).sum(), tokens
        ratio_sum, ratio_units, clipped = (ratio * m).sum(), tokens, (took_clip & mask).sum(dtype=jnp.int32)
    stats = dict(kl_sum=completion_mean(kl).sum(), completions=completions, completion_tokens=tokens)
    return loss_sum, count, stats | dict(ratio_sum=ratio_sum, ratio_units=ratio_units, clipped=clipped)


ROW_KEYS = ("input_ids", "positions", "segment_ids", "token_index", "completions")
"""The batch arrays `completion_logprobs` reads (`sid.rl.rollout.group_rows`)."""


def completion_logprobs(model: Qwen2, rows: Mapping[str, Array]) -> Float[Array, "cells groups group tokens"]:
    """float32 log-probs (log-softmax over the valid vocab, temperature 1, as upstream's loss) of each completion's
    tokens given its prompt, for the groups packed in `rows` (`sid.rl.rollout.group_rows`).

    A row holds groups ``[prompt | completion 1 | ... | completion G]``, each completion without its last token.
    Each prompt is a shared prefix whose members are its completions (`sid.models.qwen2.prefix_segments`), so one
    causal forward runs each prompt once and every completion attends to its prompt and to its own earlier tokens
    only: the log-probs of G separate ``[prompt | completion]`` rows, for 1/G of their prompt tokens. Each
    completion token's logits come from the hidden state at its ``token_index`` column of its cell's rows (the
    prompt's last for the first token), gathered within the cell, so the gather splits over the mesh with the
    cells; the head runs on the cells' group slots only, however the groups lie in rows.
    """
    completions, (cells, _, width) = rows["completions"], rows["input_ids"].shape  # [cells, groups, G, T]
    hidden = model(*(rows[k].reshape(-1, width) for k in ("input_ids", "positions", "segment_ids")))
    by_cell = hidden.reshape(cells, -1, hidden.shape[-1])
    picked = jax.vmap(lambda h, i: h[i])(by_cell, rows["token_index"].reshape(cells, -1))
    picked = picked.reshape(*completions.shape, hidden.shape[-1])
    logits = model.logits(picked)
    # The token's logit by a masked sum, not a gather: under a mesh the logits are split over the vocab (as in
    # sid.loss); and no [..., vocab] log-softmax is materialised beside the logits.
    is_token = jax.lax.broadcasted_iota(jnp.int32, logits.shape, logits.ndim - 1) == completions[..., None]
    picked_logits = jnp.where(is_token, logits, 0.0).sum(axis=-1)
    return picked_logits - jax.nn.logsumexp(logits, axis=-1)


def make_loss_fn(*, beta: float, kind: str = "grpo", clip_eps: float | None = None):
    """`grpo_loss` of the policy as a `sid.step.LossFn` ``(model, batch, key) -> (loss sum, count, stats)``.

    The batch holds `sid.rl.rollout.group_rows`' rows (``input_ids``, ``positions``, ``segment_ids`` [cells, rows,
    width]; ``completions``, ``completion_mask``, ``token_index`` [cells, groups, G, T]), plus, laid out by the
    same plan, ``advantages`` [cells, groups, G] and the reference model's ``ref_logp`` [cells, groups, G, T]
    (computed once per rollout with `completion_logprobs`), and optionally the rollout policy's ``old_logp``.
    Per-completion ``rollout/<name>`` columns [cells, groups, G] (the rollout's figures, `sid.rl.source`) are
    summed over the completions with a token into the stats as ``rollout/<name>_sum``. Empty group slots have no
    completion token and count for nothing."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown GRPO loss kind {kind!r}: expected one of {LOSS_KINDS}")

    def per_completion(x: Array) -> Array:  # [cells, groups, G, ...] -> [cells * groups * G, ...], the loss's rows
        return x.reshape(-1, *x.shape[3:])

    def loss_fn(model: Qwen2, batch: dict[str, Array], key: Array):
        del key  # nothing random in the loss (no dropout)
        logp = completion_logprobs(model, batch)
        old_logp = batch.get("old_logp")
        mask = per_completion(batch["completion_mask"])
        loss_sum, count, stats = grpo_loss(
            per_completion(logp),
            per_completion(batch["ref_logp"]),
            None if old_logp is None else per_completion(old_logp),
            mask,
            per_completion(batch["advantages"]),
            beta=beta,
            kind=kind,
            clip_eps=clip_eps,
        )
        rows = mask.astype(bool).any(axis=1)
        for name, column in batch.items():
            if name.startswith("rollout/"):
                stats[f"{name}_sum"] = jnp.where(rows, per_completion(column).astype(jnp.float32), 0.0).sum()
        stats["row_tokens"] = jnp.asarray(batch["input_ids"].size, jnp.int32)  # what the forward ran, padding too
        return loss_sum, count, stats

    return loss_fn


def rl_step_stats(m: dict) -> dict[str, float]:
    """A GRPO step's logged figures from its summed stats (`sid.trainer.fit`'s `step_stats`): the mean KL and
    completion length, the mean importance ratio and the clipped fraction, each rollout figure's mean, and
    `row_fill`, the share of the rows' tokens that are real (the step's `tokens`; the rest is padding)."""
    completions, units = max(int(m["completions"]), 1), max(int(m["ratio_units"]), 1)
    out = {
        "kl": float(m["kl_sum"]) / completions,
        "completion_length": int(m["completion_tokens"]) / completions,
        "ratio": float(m["ratio_sum"]) / units,
        "clip_fraction": int(m["clipped"]) / units,
        "row_fill": int(m["tokens"]) / max(int(m["row_tokens"]), 1),
    }
    for key, value in m.items():
        if key.startswith("rollout/") and key.endswith("_sum"):
            out[key.removesuffix("_sum")] = float(value) / completions
    return out
