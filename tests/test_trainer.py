"""The training engine: sharding, accumulation, NaN and SIGTERM handling, chunked cross-entropy."""

import dataclasses
import json
import os
import signal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sid.config import MeshConfig, TrainConfig, WandbConfig
from sid.errors import NonFiniteLoss
from sid.loss import cross_entropy_sum
from sid.models.flops import TrainFlops
from sid.parallel.host import to_global
from sid.parallel.mesh import make_mesh
from sid.parallel.report import format_bytes
from sid.run import RunDir
from sid.step import init_state, make_train_step
from sid.tracking import Tracker
from sid.trainer import fit

VOCAB, WIDTH, ROWS, LEN = 48, 16, 16, 8


class Toy(eqx.Module):
    """Embedding + a scanned stack of tanh layers + tied head: enough structure to exercise the engine."""

    embed: jax.Array
    layers: jax.Array

    def __call__(self, ids):
        def body(h, w):
            return jnp.tanh(h @ w), None

        return jax.lax.scan(body, self.embed[ids], self.layers)[0]


def toy_model(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return Toy(jax.random.normal(k1, (VOCAB, WIDTH)) * 0.3, jax.random.normal(k2, (2, WIDTH, WIDTH)) * 0.3)


def toy_loss(model, batch, key):
    h = model(batch["input_ids"])
    return cross_entropy_sum(h, model.embed, batch["targets"], valid_vocab=VOCAB, compute_dtype=jnp.float32)


def toy_batch(i, rows=ROWS):
    r = np.random.default_rng(i)
    x = r.integers(0, VOCAB, (rows, LEN)).astype(np.int32)
    t = ((x * 7 + 3) % VOCAB).astype(np.int32)
    t[r.random((rows, LEN)) < 0.25] = -100  # unsupervised tokens, unevenly spread over micro-batches
    return {"input_ids": x, "targets": t}


class ToyBatches:
    def __init__(self, nan_at=None, sigterm_at=None):
        self.i, self.nan_at, self.sigterm_at = 0, nan_at, sigterm_at

    def __next__(self):
        if self.sigterm_at is not None and self.i == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        b = toy_batch(self.i)
        self.i += 1
        return b

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def one_step(mesh, accum, batch):
    opt = optax.sgd(0.1)
    state, static, sharding = init_state(toy_model(), opt, seed=0, mesh=mesh)
    step = make_train_step(
        static, toy_loss, opt, accum=accum, mesh=mesh, state_sharding=sharding, lr_schedule=optax.constant_schedule(0.1)
    )
    new_state, metrics = step(state, to_global(batch, mesh))
    return jax.device_get(metrics), jax.device_get(new_state.params)


def test_sharded_step_equals_single_device():
    batch = toy_batch(0)
    single = one_step(make_mesh(MeshConfig(), devices=jax.devices()[:1]), 1, batch)
    for mesh_cfg in (MeshConfig(), MeshConfig(dp=2, fsdp=2, tp=2)):
        sharded = one_step(make_mesh(mesh_cfg), 1, batch)
        np.testing.assert_allclose(sharded[0]["loss"], single[0]["loss"], rtol=1e-6)
        np.testing.assert_allclose(sharded[0]["grad_norm"], single[0]["grad_norm"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1]), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loss_stats_may_not_overwrite_the_steps_figures():
    """A loss stat named like a figure the step computes itself (here `tokens`) is refused, not silently kept."""

    def clashing_loss(model, batch, key):
        loss_sum, count = toy_loss(model, batch, key)
        return loss_sum, count, {"tokens": count}

    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    opt = optax.sgd(0.1)
    state, static, sharding = init_state(toy_model(), opt, seed=0, mesh=mesh)
    step = make_train_step(
        static, clashing_loss, opt, accum=1, mesh=mesh, state_sharding=sharding, lr_schedule=lambda s: 0.1
    )
    with pytest.raises(ValueError, match=r"the loss's stats \['tokens'\] would overwrite the step's own figures"):
        step(state, to_global(toy_batch(0), mesh))


def test_accumulation_equals_one_big_batch():
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:2])
    batch = toy_batch(1, rows=16)
    big = one_step(mesh, 1, batch)
    acc = one_step(mesh, 4, batch)
    # The loss is the token-weighted mean over the whole effective batch, not a mean of micro-batch means.
    np.testing.assert_allclose(acc[0]["loss"], big[0]["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(acc[1]), jax.tree.leaves(big[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_cross_entropy_matches_dense():
    r = np.random.default_rng(0)
    h = jnp.asarray(r.normal(size=(3, 5, 8)), jnp.float32)
    w = jnp.asarray(r.normal(size=(11, 8)), jnp.float32)
    t = jnp.asarray(r.integers(-1, 9, (3, 5)), jnp.int32).at[0, 0].set(-100)
    total, n = cross_entropy_sum(h, w, t, valid_vocab=9, compute_dtype=jnp.float32)
    logits = np.asarray(h @ w.T, np.float64)[..., :9]
    lse = np.log(np.exp(logits).sum(-1))
    tt = np.asarray(t)
    mask = tt >= 0
    picked = np.take_along_axis(logits, np.maximum(tt, 0)[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(total), float(((lse - picked) * mask).sum()), rtol=1e-5)
    assert int(n) == mask.sum()


def test_one_pass_logsumexp_and_pick_match_float64_reference_on_extreme_rows():
    from sid.loss import _logsumexp_and_pick

    x = np.random.default_rng(2).normal(scale=30.0, size=(7, 1000))
    x[1, :990] = -np.inf  # padded vocab rows: -inf logits
    x[2] = -np.inf  # a row with nothing to normalise: -inf, not nan
    x[3, 17] = 1e4  # one dominant logit: naive exp overflows
    x[4] -= 1e4  # every logit very negative: naive exp underflows to 0
    with np.errstate(divide="ignore"):
        ref = np.logaddexp.reduce(x, axis=-1)
    targets = np.array([5, 995, 0, 17, 999, -100, 1000])  # -100 is ignored (picks 0); 1000 is bad data (NaN)
    got, picked, _ = jax.jit(_logsumexp_and_pick)(jnp.asarray(x, jnp.float32), jnp.asarray(targets))
    got = np.asarray(got)
    assert got[2] == -np.inf
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    want = np.where(targets >= 0, x[np.arange(7), np.minimum(np.maximum(targets, 0), 999)], 0.0)
    want[6] = np.nan
    np.testing.assert_array_equal(np.asarray(picked), want.astype(np.float32))


def test_chunk_size_is_the_largest_divisor_within_budget(monkeypatch):
    import sid.loss

    assert sid.loss.chunk_size(16384, 152320) == 4096  # 1.5B at 16,384 tokens: 2^30 // 152,320 = 7,049 -> 4,096
    assert sid.loss.chunk_size(1000, 65) == 1000  # a small vocab: one chunk
    monkeypatch.setattr(sid.loss, "CHUNK_ELEMENTS", 100)
    assert sid.loss.chunk_size(21, 10) == 7  # budget 10 tokens; 21 = 3 x 7
    assert sid.loss.chunk_size(13, 10) == 1  # a prime above the budget: token by token
    assert sid.loss.chunk_size(5, 1000) == 1  # vocab above the budget: still one token per chunk


@pytest.mark.parametrize("chunk_elements", [1 << 30, 3 * 11])  # one chunk; five chunks of 3 tokens
def test_chunked_cross_entropy_gradients_match_autodiff_of_dense(monkeypatch, chunk_elements):
    import sid.loss

    monkeypatch.setattr(sid.loss, "CHUNK_ELEMENTS", chunk_elements)
    r = np.random.default_rng(1)
    h = jnp.asarray(r.normal(size=(3, 5, 8)), jnp.float32)
    w = jnp.asarray(r.normal(size=(11, 8)), jnp.float32)
    t = jnp.asarray(r.integers(-1, 9, (3, 5)), jnp.int32).at[1, 2].set(-100)

    def dense(h, w):
        logits = (h @ w.T)[..., :9]
        picked = jnp.take_along_axis(logits, jnp.maximum(t, 0)[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(t >= 0, jax.nn.logsumexp(logits, -1) - picked, 0.0))

    def chunked(h, w, dtype):
        return cross_entropy_sum(h, w, t, valid_vocab=9, compute_dtype=dtype)[0]

    ref = jax.grad(dense, argnums=(0, 1))(h, w)
    for dtype, tol in [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)]:
        got = jax.jit(jax.grad(chunked, argnums=(0, 1)), static_argnums=2)(h, w, dtype)
        for g, gr in zip(got, ref, strict=True):
            assert g.dtype == jnp.float32
            np.testing.assert_allclose(np.asarray(g), np.asarray(gr), atol=tol * float(jnp.abs(gr).max()))
    # The padded vocab rows (ids 9, 10) are never predicted, so they get no gradient.
    assert not np.asarray(jax.grad(chunked, argnums=1)(h, w, jnp.float32))[9:].any()


def test_cross_entropy_vjp_scales_by_the_cotangent_and_keeps_the_loss():
    """The gradients are formed in the forward pass: the loss under value_and_grad must equal the plain loss, and a
    scaled loss (the trainer divides by the token count) must give scaled gradients, in both inputs' dtypes."""
    r = np.random.default_rng(2)
    h = jnp.asarray(r.normal(size=(4, 6, 8)), jnp.bfloat16)
    w = jnp.asarray(r.normal(size=(13, 8)), jnp.float32)
    t = jnp.asarray(r.integers(-1, 12, (4, 6)), jnp.int32)

    def loss(h, w, scale):
        return scale * cross_entropy_sum(h, w, t, valid_vocab=12, compute_dtype=jnp.float32)[0]

    plain = loss(h, w, 1.0)
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(h, w, 1.0)
    # Equal up to the order XLA sums the tokens' losses in (the two paths fuse that sum differently): 1 ulp here.
    np.testing.assert_allclose(float(value), float(plain), rtol=1e-6)
    scaled_value, scaled = jax.value_and_grad(loss, argnums=(0, 1))(h, w, 0.37)
    np.testing.assert_allclose(float(scaled_value), 0.37 * float(plain), rtol=1e-6)
    assert scaled[0].dtype == jnp.bfloat16 and scaled[1].dtype == jnp.float32
    for g, g1 in zip(scaled, grads, strict=True):
        g, g1 = np.asarray(g, np.float32), np.asarray(g1, np.float32)
        np.testing.assert_allclose(g, 0.37 * g1, rtol=1e-2, atol=1e-2 * np.abs(g1).max())


def run_fit(tmp_path, batches, steps=8, flops=None, evaluators=(), **overrides):
    cfg = TrainConfig(
        output_dir=str(tmp_path), max_steps=steps, per_device_batch_size=2, log_every=1, progress_bar=False, **overrides
    )
    mesh = make_mesh(MeshConfig())
    run = RunDir(cfg.output_dir, cfg)
    sched = optax.constant_schedule(0.05)
    return fit(
        model=toy_model(),
        loss_fn=toy_loss,
        optimizer=optax.adam(sched),
        lr_schedule=sched,
        batches=batches,
        total_steps=steps,
        cfg=cfg,
        mesh=mesh,
        run=run,
        tracker=Tracker(WandbConfig(), run_name="t", config={}),
        flops=flops,
        evaluators=evaluators,
    )


def test_mfu_counts_every_token_and_the_head_per_supervised_token(tmp_path, monkeypatch):
    import json

    import sid.meter

    monkeypatch.setattr(sid.meter, "peak_flops_per_device", lambda: 1e6)
    run_fit(tmp_path, ToyBatches(), steps=5, flops=TrainFlops(per_token=10.0, per_target=1000.0))
    last = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    # Step 1 (batch 0) compiles and is not timed; steps 2-5 draw batches 1-4.
    tokens = sum(toy_batch(i)["input_ids"].size for i in range(1, 5))
    targets = sum(int((toy_batch(i)["targets"] >= 0).sum()) for i in range(1, 5))
    assert 0 < targets < tokens
    seconds = tokens / last["tokens_per_s"]
    assert last["mfu"] == pytest.approx((10.0 * tokens + 1000.0 * targets) / seconds / (1e6 * 8), rel=1e-9)


def test_loss_decreases_and_checkpoints(tmp_path):
    _, summary = run_fit(tmp_path, ToyBatches(), steps=30)
    losses = [
        float(x.split('"loss": ')[1].split(",")[0]) for x in (tmp_path / "metrics.jsonl").read_text().split("\n") if x
    ]
    assert losses[-1] < 0.8 * losses[0]
    assert summary["final_step"] == 30
    assert (tmp_path / "checkpoints" / "30").is_dir()


def test_each_compiled_step_logs_what_it_needs_per_device(tmp_path, monkeypatch):
    import sid.meter

    def compile_lines(run_dir):
        return [line for line in (run_dir / "train.log").read_text().splitlines() if " compiled in " in line]

    _, summary = run_fit(tmp_path / "cpu", ToyBatches(), steps=3)
    need = summary["step_memory_bytes"]
    # At least the toy's f32 params (embed VOCAB x WIDTH, 2 x WIDTH x WIDTH) and Adam's two moments like them.
    assert need >= 4 * 3 * (VOCAB * WIDTH + 2 * WIDTH * WIDTH)
    (line,) = compile_lines(tmp_path / "cpu")  # one batch shape, one compilation
    assert f"train step for input_ids ({ROWS}, {LEN}) compiled in " in line
    assert line.endswith(f" s: {format_bytes(need)} per device")
    # Where the backend reports the device's memory (GPU, TPU), the line says how much of it the step takes.
    monkeypatch.setattr(sid.meter, "device_memory_limit", lambda: 4 * need)
    run_fit(tmp_path / "limited", ToyBatches(), steps=2)
    (line,) = compile_lines(tmp_path / "limited")
    assert line.endswith(f" s: {format_bytes(need)} per device of {format_bytes(4 * need)} (25%)")


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(tmp_path):
    class NaNAfter(ToyBatches):
        def __next__(self):
            b = super().__next__()
            if self.i > 5:  # the 6th batch onward poisons the loss
                b["targets"] = np.full_like(b["targets"], VOCAB + 5)  # outside the valid vocab: -inf logit
            return b

    with pytest.raises(NonFiniteLoss, match="at step 6.*Last good checkpoint: 4"):
        run_fit(tmp_path, NaNAfter(), steps=10, save_every=2)
    assert (tmp_path / "checkpoints" / "4").is_dir()
    assert not (tmp_path / "checkpoints" / "6").exists()


def test_sigterm_saves_and_returns(tmp_path):
    _, summary = run_fit(tmp_path, ToyBatches(sigterm_at=3), steps=10)
    assert summary["preempted_at"] == 4
    assert (tmp_path / "checkpoints" / "4").is_dir()


def sparse_supervision(rows, length, per_row, vocab, seed):
    """Hidden states NaN at every unsupervised token, and targets that supervise `per_row` random tokens per row."""
    r = np.random.default_rng(seed)
    h = r.normal(size=(rows, length, 8))
    t = np.full((rows, length), -100, np.int32)
    for row in range(rows):
        picked = r.choice(length, per_row, replace=False)
        t[row, picked] = r.integers(0, vocab, per_row)
    return np.where((t >= 0)[..., None], h, np.nan), t


def dense_loss(h, w, t, valid_vocab):
    """float64 loss and gradients of the supervised tokens alone (a dense log-softmax over the valid vocab)."""
    keep = t >= 0
    x, tt = h[keep], t[keep]
    logits = x @ w[:valid_vocab].T
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    loss = -np.log(p[np.arange(len(tt)), tt]).sum()
    dlogits = p - np.eye(valid_vocab)[tt]
    dh = np.zeros_like(h)
    dh[keep] = dlogits @ w[:valid_vocab]
    dw = np.zeros_like(w)
    dw[:valid_vocab] = dlogits.T @ x
    return loss, dh, dw


@pytest.mark.parametrize("mesh_cfg", [None, MeshConfig(fsdp=8), MeshConfig(dp=2, fsdp=2, tp=2)])
def test_cross_entropy_computes_only_chunks_with_supervised_tokens(monkeypatch, mesh_cfg):
    """Every token that is not supervised has NaN hidden states: the loss and gradients stay finite, and equal a dense
    float64 reference over the supervised tokens, only if no chunk holding one of them is computed. Each row (the
    rows one device holds, over a mesh) supervises 8 tokens at random positions: its first chunk once sorted."""
    import sid.loss
    from sid.parallel.trace import traced_on

    rows, length, vocab, valid = 8, 32, 11, 9
    groups = 1 if mesh_cfg is None else 8 // mesh_cfg.tp  # rows split over dp x fsdp: one row per group here
    tokens_per_chunk = 8 * rows // groups  # 8 tokens of each of a group's rows
    monkeypatch.setattr(sid.loss, "CHUNK_ELEMENTS", tokens_per_chunk * groups * vocab)
    h, t = sparse_supervision(rows, length, 8, valid, seed=4)
    w = np.random.default_rng(5).normal(size=(vocab, 8))
    ref_loss, ref_dh, ref_dw = dense_loss(np.nan_to_num(h), w, t, valid)

    def loss(h, w):
        return cross_entropy_sum(h, w, jnp.asarray(t), valid_vocab=valid, compute_dtype=jnp.float32)

    fn, plain = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), loss
    args = (jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32))
    if mesh_cfg is not None:
        mesh = make_mesh(mesh_cfg)
        fn, plain = traced_on(mesh, fn), traced_on(mesh, loss)
        rows_split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("dp", "fsdp")))
        args = (jax.device_put(args[0], rows_split), args[1])
    (total, n), (dh, dw) = jax.jit(fn)(*args)
    assert int(n) == 8 * rows
    np.testing.assert_allclose(float(total), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=1e-4, atol=1e-5)  # 0 (not NaN) at unsupervised tokens
    # Without differentiation (held-out loss) the same chunks are skipped.
    np.testing.assert_allclose(float(jax.jit(plain)(*args)[0]), ref_loss, rtol=1e-5)


def test_cross_entropy_computes_every_chunk_a_group_needs(monkeypatch):
    """Groups that need different numbers of chunks: the loop runs to the most any group needs (a max over the
    devices), and rows with no supervised token or with every token supervised are both exact."""
    import sid.loss
    from sid.parallel.trace import traced_on

    rows, length, vocab = 8, 16, 13
    monkeypatch.setattr(sid.loss, "CHUNK_ELEMENTS", 4 * 8 * vocab)  # 4 tokens per group per chunk
    r = np.random.default_rng(6)
    h = r.normal(size=(rows, length, 8))
    share = np.linspace(0, 1, rows)[:, None]  # row 0 supervises nothing
    t = np.where(r.random((rows, length)) < share, r.integers(0, vocab, (rows, length)), -100)
    t[-1] = r.integers(0, vocab, length)  # all supervised: every chunk of the last group
    w = r.normal(size=(vocab, 8))
    ref_loss, ref_dh, ref_dw = dense_loss(h, w, t, vocab)
    mesh = make_mesh(MeshConfig(fsdp=8))

    def loss(h, w):
        return cross_entropy_sum(h, w, jnp.asarray(t), valid_vocab=vocab, compute_dtype=jnp.float32)[0]

    rows_split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    args = (jax.device_put(jnp.asarray(h, jnp.float32), rows_split), jnp.asarray(w, jnp.float32))
    total, (dh, dw) = jax.jit(traced_on(mesh, jax.value_and_grad(loss, argnums=(0, 1))))(*args)
    np.testing.assert_allclose(float(total), ref_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dh), ref_dh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), ref_dw, rtol=1e-4, atol=1e-5)


def test_per_task_losses_from_the_loss_stats_add_up_to_the_step_loss(tmp_path):
    """A loss that reports sums per group (here: even and odd positions) gets them summed over micro-batches and
    logged as means; token-weighted, they give the step's loss."""

    def grouped_loss(model, batch, key):
        h = model(batch["input_ids"])
        parts = {}
        for name, keep in (("even", 0), ("odd", 1)):
            t = jnp.where(jnp.arange(LEN) % 2 == keep, batch["targets"], -100)
            parts[name] = cross_entropy_sum(h, model.embed, t, valid_vocab=VOCAB, compute_dtype=jnp.float32)
        total = sum(p[0] for p in parts.values())
        stats = {f"loss_sum/{k}": p[0] for k, p in parts.items()} | {f"tokens/{k}": p[1] for k, p in parts.items()}
        return total, sum(p[1] for p in parts.values()), stats

    cfg = TrainConfig(output_dir=str(tmp_path), max_steps=3, per_device_batch_size=1, grad_accum_steps=2, log_every=1)
    sched = optax.constant_schedule(0.05)
    fit(
        model=toy_model(), loss_fn=grouped_loss, optimizer=optax.adam(sched), lr_schedule=sched,
        batches=ToyBatches(), total_steps=3, cfg=dataclasses.replace(cfg, progress_bar=False),
        mesh=make_mesh(MeshConfig()), run=RunDir(cfg.output_dir, cfg),
        tracker=Tracker(WandbConfig(), run_name="t", config={}),
    )  # fmt: skip
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for i, r in enumerate(records):
        t = toy_batch(i)["targets"]
        n_even, n_odd = int((t[:, 0::2] >= 0).sum()), int((t[:, 1::2] >= 0).sum())
        assert n_even > 0 and n_odd > 0
        weighted = (r["loss/even"] * n_even + r["loss/odd"] * n_odd) / (n_even + n_odd)
        assert weighted == pytest.approx(r["loss"], rel=1e-5)
    # Step 1 is the initial model's loss: each group's mean against a float64 NumPy oracle.
    model, b = toy_model(), toy_batch(0)
    logits = np.asarray(model(b["input_ids"]), np.float64) @ np.asarray(model.embed, np.float64).T
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    for name, keep in (("even", 0), ("odd", 1)):
        mask = (b["targets"] >= 0) & (np.arange(LEN) % 2 == keep)
        picked = np.take_along_axis(logp, np.maximum(b["targets"], 0)[..., None], -1)[..., 0]
        assert records[0][f"loss/{name}"] == pytest.approx(-picked[mask].mean(), rel=1e-5)


class RolloutClock:
    """A fake clock and device for a loop whose batch source needs the last update's params, as RL's rollouts do:
    each step's update takes UPDATE s on the device from its dispatch; drawing a batch waits for the last update,
    then rolls out (ROLLOUT s); reading a step's metrics waits for its update; an evaluation takes EVAL s."""

    UPDATE, ROLLOUT, EVAL = 0.25, 0.5, 4.0

    def __init__(self):
        self.now, self.done_at = 0.0, []  # each dispatched step's end; popped as the steps are read

    def perf_counter(self):
        return self.now

    def rollout(self):
        self.now = max([self.now, *self.done_at]) + self.ROLLOUT
        self.done_at.append(self.now + self.UPDATE)  # the step dispatched on this batch

    def read_oldest_step(self):
        self.now = max(self.now, self.done_at.pop(0))


def test_step_time_is_one_update_and_rollout_also_where_an_evaluation_or_a_save_reads_it_early(tmp_path, monkeypatch):
    """Before an evaluation or a save the loop reads the step at once, before the next rollout: the step's time still
    holds that rollout (as every other step's does) and never the evaluation."""
    import types

    import sid.meter

    clock = RolloutClock()

    class Rollouts(ToyBatches):
        def __next__(self):
            clock.rollout()
            return super().__next__()

    class Timed:
        every = 3

        def __call__(self, model, step):
            clock.now += clock.EVAL
            return {"valid/hr@10": 0.0}

    class Jax:  # sid.meter's view of jax: reading metrics takes the fake device's time
        def __getattr__(self, name):
            return getattr(jax, name)

        def device_get(self, x):
            clock.read_oldest_step()
            return jax.device_get(x)

    monkeypatch.setattr(sid.meter, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    monkeypatch.setattr(sid.meter, "jax", Jax())
    _, summary = run_fit(tmp_path, Rollouts(), steps=8, evaluators=[Timed()], save_every=4)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["step_time_s"] for r in records if "step_time_s" in r}
    period = clock.UPDATE + clock.ROLLOUT
    assert times == {1: clock.ROLLOUT + period, **dict.fromkeys(range(2, 8), period), 8: clock.UPDATE}
    assert summary["step_time_s"] == pytest.approx((6 * period + clock.UPDATE) / 7)


def test_progress_bar_shows_the_named_step_stats(tmp_path):
    from sid.meter import Meter

    cfg = TrainConfig(output_dir=str(tmp_path))
    meter = Meter(
        run=RunDir(cfg.output_dir, cfg), tracker=Tracker(WandbConfig(), run_name="t", config={}), total_steps=3,
        start=0, log_every=1, flops=None, n_devices=1, progress_bar=True, last_good=lambda: "none",
        step_stats=lambda m: {"rollout/reward_mean": float(m["reward"]), "kl": 0.5}, bar_stats=("rollout/reward_mean",),
    )  # fmt: skip
    figures = {"loss": 0.0, "lr": 1.0, "grad_norm": 1.0, "tokens": 8, "supervised_tokens": 2}
    for step, reward in ((1, 0.25), (2, 0.125)):
        meter.push(step, {**figures, "reward": reward})
    meter.finish()
    assert "reward_mean=0.125" in meter.bar.postfix and "kl" not in meter.bar.postfix
    meter.close()
