"""Next-token cross-entropy in f32 without materialising f32 logits for every token × the whole vocab.

Tokens are processed in chunks, so only one chunk's logits exist at a time. Under differentiation the gradients
are formed in the same pass as the loss (a custom VJP whose forward already computes d(loss)/d(hidden) and
d(loss)/d(head); its backward only scales them by the incoming cotangent): each chunk's logits are computed once,
not once in the forward and again in the backward, which saves one [tokens, vocab, hidden] matmul, a quarter of the
head's FLOPs. d(loss)/d(logits) = softmax - onehot is formed in f32 and cast to the compute dtype before the two
gradient matmuls (f32 operands there would make them the slowest matmuls of a training step). Without
differentiation (held-out loss) only the loss is computed.

Only tokens with a target need the head at all, and in SFT those are the completions, a sixth of the tokens. Each
device's tokens are reordered supervised-first, and chunks past the last supervised token are skipped by a branch.

Label smoothing (optional) spreads its mass over the valid vocab only. Per-task loss sums (`cross_entropy_by_task`,
`sft_loss`'s stats) are summed from the per-token losses inside the same chunk loop: no second pass over the head.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sid.data.tasks import TASKS
from sid.models.layers import DTYPES
from sid.models.qwen2 import Qwen2
from sid.parallel.trace import batch_split, replicas_max

CHUNK_ELEMENTS = 1 << 30
"""Logits elements per chunk (4 GiB in f32 on one device; split over the devices that share the tokens). Fewer,
larger chunks mean fewer passes over the f32 d(head) accumulator (each chunk reads and writes all of it) and a
d(head) matmul that contracts over more tokens per pass: 4,096 tokens per chunk at Qwen's vocab."""


def chunk_size(num_tokens: int, vocab: int) -> int:
    """Tokens per chunk: as many as fit the element budget, dividing num_tokens exactly."""
    target = max(1, min(num_tokens, CHUNK_ELEMENTS // max(vocab, 1)))
    while num_tokens % target:
        target -= 1
    return target


def sft_loss(
    model: Qwen2, batch: dict[str, Array], key: Array | None, *, label_smoothing: float = 0.0
) -> tuple[Float[Array, ""], Int[Array, ""], dict[str, Array]]:
    """The SFT objective of a Qwen2 on a packed batch: (sum of the token losses over the supervised tokens, their
    number, stats). `key` turns on the model's dropout (None: none). `stats` holds additive scalars for every task
    of TASKS: `loss_sum/{task}` (f32) and `tokens/{task}` (i32) over the tokens of the batch's `task_ids` (a batch
    without `task_ids` gives zeros), so a trainer can sum them over micro-batches and log `loss/{task}`."""
    targets, task_ids = batch["targets"], batch.get("task_ids")
    hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"], key=key)
    total, count, per_task = cross_entropy_by_task(
        hidden,
        model.head_weight(),
        targets,
        task_ids,
        num_tasks=len(TASKS),
        valid_vocab=model.valid_vocab,
        compute_dtype=DTYPES[model.config.compute_dtype],
        label_smoothing=label_smoothing,
    )
    if task_ids is None:
        tokens = jnp.zeros(len(TASKS), jnp.int32)
    else:
        tokens = ((task_ids[..., None] == jnp.arange(len(TASKS))) & (targets >= 0)[..., None]).sum((0, 1))
    stats = {f"loss_sum/{task}": per_task[i] for i, task in enumerate(TASKS)}
    stats |= {f"tokens/{task}": tokens[i].astype(jnp.int32) for i, task in enumerate(TASKS)}
    return total, count, stats


def cross_entropy_sum(
    hidden: Float[Array, "rows ... d"],
    head: Float[Array, "v d"],
    targets: Int[Array, "rows ..."],
    *,
    valid_vocab: int,
    compute_dtype=jnp.bfloat16,
    label_smoothing: float = 0.0,
) -> tuple[Float[Array, ""], Int[Array, ""]]:
    """Sum of the token losses over tokens with target >= 0, and the number of such tokens (`cross_entropy_by_task`
    without tasks)."""
    total, count, _ = cross_entropy_by_task(
        hidden, head, targets, valid_vocab=valid_vocab, compute_dtype=compute_dtype, label_smoothing=label_smoothing
    )
    return total, count


def cross_entropy_by_task(
    hidden: Float[Array, "rows ... d"],
    head: Float[Array, "v d"],
    targets: Int[Array, "rows ..."],
    task_ids: Int[Array, "rows ..."] | None = None,
    *,
    num_tasks: int = 0,
    valid_vocab: int,
    compute_dtype=jnp.bfloat16,
    label_smoothing: float = 0.0,
) -> tuple[Float[Array, ""], Int[Array, ""], Float[Array, " tasks"]]:
    """Sum of the token losses over tokens with target >= 0, the number of such tokens, and the sum of the same
    losses per task: [num_tasks] sums over the tokens whose `task_ids` is that task (other ids count in the total
    only). The per-task sums are for logging and carry no gradient.

    A token's loss is -log p(target), or with label smoothing e: (1 - e) (-log p(target)) + e * mean over the
    valid ids of -log p(id), i.e. cross-entropy against (1 - e) onehot + e / valid_vocab on each valid id.

    Logits are `hidden @ head.T` in `compute_dtype` with f32 accumulation; ids >= valid_vocab are excluded
    from the softmax (padded vocab rows can never be predicted). Gradients flow to `hidden` and `head`
    (d(head) accumulated in f32 over the chunks).

    Only chunks that hold a supervised token are computed. Each group of rows that one device holds (`batch_split`)
    puts its supervised tokens first (a stable sort: a permutation of the hidden states, undone in the backward
    pass), and the chunk loop skips the chunks past the last one any group needs. In SFT only the completions
    are supervised (17% of the seed recipe's tokens), so most of the head's matmuls and the softmax passes over
    prompt tokens are skipped. Skipped tokens contribute exactly zero to the loss and the gradients anyway.
    """
    d, v = hidden.shape[-1], head.shape[0]
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
    groups = batch_split()
    if hidden.shape[0] % groups:  # rows not split evenly over the devices (never in the trainer): one group
        groups = 1
    t = targets.reshape(groups, -1)
    task = jnp.full_like(t, -1) if task_ids is None else task_ids.reshape(groups, -1)
    m = chunk_size(t.shape[1], v * groups)  # tokens per group in a chunk: the element budget holds for all groups

    order = jnp.argsort(t < 0, axis=1, stable=True)
    h = _permute(hidden.reshape(groups, -1, d), order)
    t, task = (jnp.take_along_axis(x, order, axis=1, mode="promise_in_bounds") for x in (t, task))
    # Chunks to compute: the same on every device (a max over all groups, the trainer's replicas included), so the
    # chunk loop's branch stays a branch, not a select of both sides.
    needed = replicas_max((jnp.max((t >= 0).sum(1)) + m - 1) // m)
    spec = _ChunkLoss(v, valid_vocab, compute_dtype, label_smoothing, num_tasks)
    total, per_task = _chunked_loss(spec, t.shape[1] // m)(*(_chunks_of(x, m) for x in (h, t, task)), head, needed)
    return total, (t >= 0).sum(), jax.lax.stop_gradient(per_task)


def _chunks_of(x: Array, m: int) -> Array:
    """[groups, tokens, ...] -> [chunks, groups * m, ...]: chunk k holds tokens [k*m, (k+1)*m) of every group, so
    each chunk's matmuls stay split over the devices by group. (Contiguous chunks of the flat tokens would each lie
    on one or two devices, and the partitioner gathered every device's hidden states onto every device to slice out
    each chunk.)"""
    groups, n = x.shape[:2]
    x = x.reshape(groups, n // m, m, *x.shape[2:]).swapaxes(0, 1)
    return x.reshape(n // m, groups * m, *x.shape[3:])


@dataclasses.dataclass(frozen=True)
class _ChunkLoss:
    """The static recipe of one chunk's loss (Python constants only: a custom_vjp function may not close over
    tracers)."""

    vocab: int
    valid_vocab: int
    compute_dtype: Any
    smoothing: float
    num_tasks: int

    def logits(self, x: Array, w: Array) -> Array:
        logits = jnp.dot(x.astype(self.compute_dtype), w.T, preferred_element_type=jnp.float32)
        return jnp.where(jnp.arange(self.vocab) < self.valid_vocab, logits, -jnp.inf)

    def token_loss(self, logits: Array, targets: Array) -> tuple[Array, Array]:
        """Each token's loss (0 where the target is negative) and each row's logsumexp."""
        smooth_over = self.valid_vocab if self.smoothing else None
        lse, picked, valid_sum = _logsumexp_and_pick(logits, targets, smooth_over)
        loss = lse - picked
        if self.smoothing:
            loss = lse - (1.0 - self.smoothing) * picked - (self.smoothing / self.valid_vocab) * valid_sum
        return jnp.where(targets >= 0, loss, 0.0), lse

    def sums(self, loss: Array, task: Array) -> tuple[Array, Array]:
        """The chunk's loss sum and its [num_tasks] per-task sums."""
        is_task = task[:, None] == jnp.arange(self.num_tasks)
        return loss.sum(), jnp.where(is_task, loss[:, None], 0.0).sum(0)

    def dlogits(self, logits: Array, lse: Array, targets: Array) -> Array:
        """d(loss)/d(logits) = softmax - the smoothed one-hot, 0 on rows without a target; in the compute dtype."""
        ids = jnp.arange(self.vocab)[None, :]
        target = (1.0 - self.smoothing) * (ids == targets[:, None]).astype(jnp.float32)
        if self.smoothing:
            target = target + (self.smoothing / self.valid_vocab) * (ids < self.valid_vocab).astype(jnp.float32)
        supervised = (targets >= 0)[:, None].astype(jnp.float32)
        return ((jnp.exp(logits - lse[:, None]) - target) * supervised).astype(self.compute_dtype)


def _chunked_loss(spec: _ChunkLoss, num_chunks: int):
    """`(hidden chunks, target chunks, task chunks, head, needed) -> (loss sum, per-task sums)` over the first
    `needed` chunks, with a custom VJP whose forward pass also forms d(hidden) and d(head) (module docstring)."""

    def zeros(head):
        return jnp.zeros((), jnp.float32), jnp.zeros((spec.num_tasks,), jnp.float32), jnp.zeros(head.shape, jnp.float32)

    def loss_only(hc, tc, task, head, needed):
        w = head.astype(spec.compute_dtype)  # cast once, outside the chunk loop

        def body(sums, xs):
            k, x, tt, tk = xs
            chunk = spec.sums(spec.token_loss(spec.logits(x, w), tt)[0], tk)
            return jax.lax.cond(k < needed, lambda: jax.tree.map(jnp.add, sums, chunk), lambda: sums), None

        return jax.lax.scan(body, zeros(head)[:2], (jnp.arange(num_chunks), hc, tc, task))[0]

    def forward_and_grads(hc, tc, task, head, needed):
        w = head.astype(spec.compute_dtype)

        def chunk(carry, x, tt, tk):
            total, per_task, dhead = carry
            logits = spec.logits(x, w)
            loss, lse = spec.token_loss(logits, tt)
            chunk_total, chunk_tasks = spec.sums(loss, tk)
            dlogits = spec.dlogits(logits, lse, tt)
            dh = jnp.dot(dlogits, w, preferred_element_type=jnp.float32).astype(x.dtype)
            dhead = dhead + jnp.dot(dlogits.T, x.astype(spec.compute_dtype), preferred_element_type=jnp.float32)
            return (total + chunk_total, per_task + chunk_tasks, dhead), dh

        def body(carry, xs):
            k, x, tt, tk = xs
            return jax.lax.cond(k < needed, chunk, lambda c, x, *_: (c, jnp.zeros_like(x)), carry, x, tt, tk)

        (total, per_task, dhead), dh = jax.lax.scan(body, zeros(head), (jnp.arange(num_chunks), hc, tc, task))
        return (total, per_task), (dh, dhead)

    def backward(res, cotangents):
        dh, dhead = res
        g = cotangents[0]  # the per-task sums are for logging: their cotangent is dropped (stop_gradient outside)
        return (g * dh).astype(dh.dtype), None, None, (g * dhead).astype(dhead.dtype), None

    loss = jax.custom_vjp(loss_only)
    loss.defvjp(forward_and_grads, backward)
    return loss


@jax.custom_vjp
def _permute(x: Float[Array, "g n d"], order: Int[Array, "g n"]) -> Float[Array, "g n d"]:
    """`x[g, order[g, i]]` for a permutation `order` of each group; the backward pass gathers by the inverse
    permutation (autodiff's transpose of a gather would be a scatter-add)."""
    return jnp.take_along_axis(x, order[..., None], axis=1, mode="promise_in_bounds")


def _permute_fwd(x, order):
    return _permute(x, order), order


def _permute_bwd(order, g):
    return _permute(g, jnp.argsort(order, axis=1)), None


_permute.defvjp(_permute_fwd, _permute_bwd)


def _logsumexp_and_pick(
    x: Float[Array, "c v"], targets: Int[Array, " c"], sum_below: int | None = None
) -> tuple[Array, Array, Array]:
    """Row-wise logsumexp, `x[row, target]` (0 where the target is negative (ignored), NaN where it is past the
    last column: bad targets stop training instead of passing silently), and, when `sum_below` is given, the sum of
    `x[row, :sum_below]` (label smoothing's mean logit; 0 otherwise).

    One read of `x` gives them all: a variadic reduce carries an online max and rescaled sum, as in flash
    attention, and masked sums for the target's logit (and the valid logits). `jax.nn.logsumexp` reads the f32
    logits twice, and at 4,096 tokens × Qwen's vocab each read is 2.5 GB; a separate masked sum would be another
    read (XLA did not fuse it with the logsumexp). The pick is not a gather because, under a mesh, the logits are
    split over the vocab (the head's rows are sharded), and XLA re-laid them out between devices for the gather.
    Rows of all -inf give -inf."""

    def combine(a, b):
        (ma, sa, *pa), (mb, sb, *pb) = a, b
        m = jnp.maximum(ma, mb)
        finite = m > -jnp.inf  # both -inf: exp(-inf - -inf) would be nan
        safe_m = jnp.where(finite, m, 0.0)

        def scale(mx):
            return jnp.where(finite, jnp.exp(mx - safe_m), 0.0)

        return m, sa * scale(ma) + sb * scale(mb), *(p + q for p, q in zip(pa, pb, strict=True))

    column = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    zero = jnp.array(0.0, x.dtype)
    operands = [x, jnp.ones_like(x), jnp.where(column == targets[..., None], x, zero)]
    if sum_below is not None:
        operands.append(jnp.where(column < sum_below, x, zero))
    init = [jnp.array(-jnp.inf, x.dtype)] + [zero] * (len(operands) - 1)
    m, s, picked, *valid_sum = jax.lax.reduce(tuple(operands), tuple(init), combine, (x.ndim - 1,))
    valid_sum = valid_sum[0] if valid_sum else jnp.zeros_like(m)
    return m + jnp.log(s), jnp.where(targets < x.shape[-1], picked, jnp.nan), valid_sum
