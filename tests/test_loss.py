"""sid.loss's label smoothing, per-task sums and `sft_loss`, against NumPy float64 oracles. (The chunked
cross-entropy's chunk skipping, VJP and mesh behaviour are covered in tests/test_trainer.py.)"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_qwen2

import sid.loss
from sid.config import MeshConfig
from sid.data.pipeline import NO_TASK, BatchPlan
from sid.data.tasks import TASKS
from sid.loss import cross_entropy_by_task, cross_entropy_sum, sft_loss
from sid.models.qwen2 import Qwen2
from sid.parallel.mesh import make_mesh
from sid.parallel.trace import traced_on


def oracle(h, w, t, tasks, valid, eps, num_tasks):
    """Loss sum, per-task sums, d(sum)/dh and d(sum)/dw in float64: cross-entropy against (1 - eps) onehot +
    eps / valid on every valid id, over the tokens with t >= 0."""
    h, w = np.asarray(h, np.float64), np.asarray(w, np.float64)
    logits = h @ w[:valid].T
    top = logits.max(-1, keepdims=True)
    logp = logits - (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))
    sup = t >= 0
    onehot = np.eye(valid)[np.where(sup, t, 0)]
    soft = (1 - eps) * onehot + eps / valid
    loss = np.where(sup, -(soft * logp).sum(-1), 0.0)
    dlogits = (np.exp(logp) - soft) * sup[..., None]
    dw = np.zeros_like(w)
    dw[:valid] = dlogits.reshape(-1, valid).T @ h.reshape(-1, h.shape[-1])
    per_task = np.array([loss[tasks == k].sum() for k in range(num_tasks)])
    return loss.sum(), per_task, dlogits @ w[:valid], dw


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("chunk_elements", [1 << 30, 4 * 13])  # one chunk; six chunks of 4 tokens
def test_loss_per_task_sums_and_gradients_equal_a_float64_oracle(monkeypatch, eps, chunk_elements):
    monkeypatch.setattr(sid.loss, "CHUNK_ELEMENTS", chunk_elements)
    r = np.random.default_rng(0)
    h = r.normal(size=(4, 6, 8))
    w = r.normal(size=(13, 8))  # ids 11 and 12 are padded vocab rows
    t = np.where(r.random((4, 6)) < 0.6, r.integers(0, 11, (4, 6)), -100)
    tasks = np.where(t >= 0, r.integers(-1, 3, (4, 6)), NO_TASK)  # some supervised tokens have no task
    want_loss, want_tasks, want_dh, want_dw = oracle(h, w, t, tasks, 11, eps, 3)

    def total(h, w):
        loss, n, per_task = cross_entropy_by_task(
            h, w, jnp.asarray(t), jnp.asarray(tasks), num_tasks=3, valid_vocab=11, compute_dtype=jnp.float32,
            label_smoothing=eps,
        )  # fmt: skip
        return loss, (n, per_task)

    args = (jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32))
    (loss, (n, per_task)), (dh, dw) = jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))(*args)
    assert int(n) == (t >= 0).sum()
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(per_task), want_tasks, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), want_dh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-4, atol=1e-5)
    assert not np.asarray(dw)[11:].any()  # smoothing spreads over the valid ids only
    # Without differentiation (held-out loss) the loss and per-task sums are the same.
    plain_loss, (_, plain_tasks) = jax.jit(total)(*args)
    np.testing.assert_allclose(float(plain_loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(plain_tasks), want_tasks, rtol=1e-5)
    # cross_entropy_sum is the same loss without tasks.
    no_tasks = cross_entropy_sum(*args, jnp.asarray(t), valid_vocab=11, compute_dtype=jnp.float32, label_smoothing=eps)
    np.testing.assert_allclose(float(no_tasks[0]), want_loss, rtol=1e-5)


def test_per_task_sums_over_a_mesh_equal_one_device(monkeypatch):
    """Rows split over 8 devices, several chunks: the per-task sums come out of the chunk loop reduced over devices."""
    monkeypatch.setattr(sid.loss, "CHUNK_ELEMENTS", 2 * 8 * 13)  # 2 tokens per device per chunk
    r = np.random.default_rng(3)
    h, w = r.normal(size=(8, 6, 8)), r.normal(size=(13, 8))
    t = np.where(r.random((8, 6)) < 0.5, r.integers(0, 11, (8, 6)), -100)
    tasks = np.where(t >= 0, r.integers(0, 3, (8, 6)), NO_TASK)
    want_loss, want_tasks, _, _ = oracle(h, w, t, tasks, 11, 0.1, 3)
    mesh = make_mesh(MeshConfig(fsdp=8))

    def f(h, w):
        return cross_entropy_by_task(
            h, w, jnp.asarray(t), jnp.asarray(tasks), num_tasks=3, valid_vocab=11, compute_dtype=jnp.float32,
            label_smoothing=0.1,
        )  # fmt: skip

    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    loss, n, per_task = jax.jit(traced_on(mesh, f))(jax.device_put(jnp.asarray(h, jnp.float32), rows), jnp.asarray(w))
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(per_task), want_tasks, rtol=1e-5)
    np.testing.assert_allclose(float(np.asarray(per_task).sum()), float(loss), rtol=1e-5)  # every token has a task


def test_smoothing_changes_the_loss_and_bad_smoothing_is_refused():
    r = np.random.default_rng(1)
    h, w, t = jnp.asarray(r.normal(size=(2, 5, 4))), jnp.asarray(r.normal(size=(7, 4))), jnp.zeros((2, 5), int)
    plain = cross_entropy_sum(h, w, t, valid_vocab=7, compute_dtype=jnp.float32)[0]
    assert abs(float(cross_entropy_sum(h, w, t, valid_vocab=7, label_smoothing=0.1)[0]) - float(plain)) > 1e-3
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_smoothing"):
            cross_entropy_sum(h, w, t, valid_vocab=7, label_smoothing=bad)


CFG = tiny_qwen2(init_std=0.2)


def packed_batch(rows: int = 4, max_len: int = 32) -> tuple[dict, list[dict]]:
    """A packed batch built by the real pipeline from samples of every task (random lengths and prompts)."""
    r = np.random.default_rng(2)
    samples = []
    for i in range(12):
        n = int(r.integers(3, 12))
        ids = r.integers(1, CFG.vocab_size, n).astype(np.int32)
        samples.append(dict(input_ids=ids, loss_mask=np.arange(n) >= r.integers(1, n), task_id=i % len(TASKS)))
    plan = BatchPlan(samples, rows_per_step=rows, max_len=max_len)
    assert plan.steps_per_epoch == 1
    return plan.build(plan.epoch(0, seed=0)[0]), samples


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sft_loss_per_task_stats_add_up_and_equal_a_float64_oracle(eps):
    model = Qwen2.init(CFG, key=jax.random.key(0))
    batch, samples = packed_batch()
    jbatch = {k: jnp.asarray(v) for k, v in batch.items()}
    total, n, stats = eqx.filter_jit(sft_loss)(model, jbatch, None, label_smoothing=eps)
    assert set(stats) == {f"{kind}/{task}" for kind in ("loss_sum", "tokens") for task in TASKS}
    # Counts: exact, and each task's equals its samples' supervised next tokens (every mask[1:] position).
    want_tokens = {task: 0 for task in TASKS}
    for s in samples:
        want_tokens[TASKS[s["task_id"]]] += int(s["loss_mask"][1:].sum())
    assert {task: int(stats[f"tokens/{task}"]) for task in TASKS} == want_tokens
    assert sum(int(stats[f"tokens/{task}"]) for task in TASKS) == int(n) == (batch["targets"] >= 0).sum()
    assert all(stats[f"tokens/{task}"].dtype == jnp.int32 for task in TASKS)
    np.testing.assert_allclose(sum(float(stats[f"loss_sum/{task}"]) for task in TASKS), float(total), rtol=1e-5)
    # Each task's mean against float64 logits from the model's hidden states.
    hidden = model(jbatch["input_ids"], jbatch["positions"], jbatch["segment_ids"])
    loss, per_task, _, _ = oracle(hidden, model.head_weight(), batch["targets"], batch["task_ids"], 64, eps, 5)
    np.testing.assert_allclose(float(total), loss, rtol=1e-5)
    for k, task in enumerate(TASKS):
        mean = float(stats[f"loss_sum/{task}"]) / int(stats[f"tokens/{task}"])
        np.testing.assert_allclose(mean, per_task[k] / want_tokens[task], rtol=1e-5)


def test_sft_loss_without_smoothing_is_the_plain_cross_entropy_and_trains():
    model = Qwen2.init(CFG, key=jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in packed_batch()[0].items()}
    hidden = model(batch["input_ids"], batch["positions"], batch["segment_ids"])
    want = cross_entropy_sum(hidden, model.head_weight(), batch["targets"], valid_vocab=64, compute_dtype=jnp.float32)
    total, n, _ = sft_loss(model, batch, jax.random.key(1))  # a key, but no dropout configured: no effect
    assert float(total) == float(want[0]) and int(n) == int(want[1])
    # The stats ride along as aux under differentiation; a batch without task_ids reports zeros.
    no_tasks = {k: v for k, v in batch.items() if k != "task_ids"}

    def f(m):
        total, n, stats = sft_loss(m, no_tasks, None)
        return total, stats

    (loss, stats), grads = eqx.filter_jit(eqx.filter_value_and_grad(f, has_aux=True))(model)
    np.testing.assert_allclose(float(loss), float(want[0]), rtol=1e-6)
    assert not any(float(v) for v in stats.values())
    assert float(jnp.abs(grads.embed.weight).max()) > 0


def test_smoothing_and_per_task_sums_add_no_matmul():
    """Both come from the logits the chunk loop already has: the traced step holds the same matmuls (the head's
    forward and its two gradient matmuls) as the plain loss, so no second pass over the head."""
    r = np.random.default_rng(4)
    h, w = jnp.asarray(r.normal(size=(2, 8, 4)), jnp.float32), jnp.asarray(r.normal(size=(9, 4)), jnp.float32)
    t = jnp.asarray(r.integers(0, 9, (2, 8)), jnp.int32)

    def dots(**kw):
        def f(h, w):
            return cross_entropy_by_task(h, w, t, jnp.zeros_like(t), valid_vocab=9, **kw)[0]

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(h, w).as_text().count("stablehlo.dot_general")

    plain = dots()
    assert plain >= 3
    assert dots(num_tasks=5, label_smoothing=0.1) == plain
