"""sid.optim: Newton–Schulz and Muon against NumPy references, muon_local vs optax's Muon, routing, schedules,
weight-decay masks, clipping, dtypes, and that every optimizer fits a small least-squares problem."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from tiny import tiny_qwen2

import sid.optim.muon as muon_module
from sid.models.config import GPTConfig
from sid.models.nanogpt import GPT
from sid.models.qwen2 import Qwen2
from sid.optim.config import OptimizerConfig
from sid.optim.muon import NS_COEFFS, newton_schulz, ns_flops, scale_by_muon
from sid.optim.muon_optax import DIMENSION_NUMBERS
from sid.optim.routing import decay_mask, label_params, routing_table
from sid.optim.schedule import make_schedule
from sid.pytree import path_str

BETA = 0.95

# --------------------------------------------------------------------------------------------------------------
# NumPy references (float64), written from Keller Jordan's Muon and optax 0.2.8's source.


def np_newton_schulz(x: np.ndarray, steps: int = 5, eps: float = 1e-7) -> np.ndarray:
    """The quintic iteration on one matrix, float64."""
    a, b, c = NS_COEFFS
    x = np.asarray(x, np.float64)
    x = x / (np.linalg.norm(x) + eps)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(steps):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


def np_muon_direction(u: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """NS per layer of a [L, out, in] stack, times sqrt(max(1, out/in))."""
    scale = max(1.0, u.shape[-2] / u.shape[-1]) ** 0.5
    return np.stack([np_newton_schulz(m, eps=eps) for m in u]) * scale


def np_muon_updates(grads, w0, *, lr, wd, nesterov, optax_bias_correction=False):
    """Parameter deltas of Muon for a gradient sequence: Keller Jordan's rule, or optax's bias-corrected Nesterov."""
    m = np.zeros_like(grads[0], np.float64)
    w = np.asarray(w0, np.float64)
    deltas = []
    for t, g in enumerate(grads, start=1):
        g = np.asarray(g, np.float64)
        m = BETA * m + (1 - BETA) * g
        if not nesterov:
            u = m
        elif optax_bias_correction:
            u = BETA * m / (1 - BETA ** (t + 1)) + (1 - BETA) * g / (1 - BETA**t)
        else:
            u = BETA * m + (1 - BETA) * g
        delta = -lr * (np_muon_direction(u) + wd * w)
        w = w + delta
        deltas.append(delta)
    return deltas


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --------------------------------------------------------------------------------------------------------------
# A Qwen2-shaped Equinox pytree with the contract's field names (stacked [L, ...] layer leaves).


class Linear(eqx.Module):
    weight: jax.Array
    bias: jax.Array | None


class RMSNorm(eqx.Module):
    weight: jax.Array


class Embedding(eqx.Module):
    weight: jax.Array


class Attention(eqx.Module):
    q_proj: Linear
    k_proj: Linear
    v_proj: Linear
    o_proj: Linear


class MLP(eqx.Module):
    gate_proj: Linear
    up_proj: Linear
    down_proj: Linear


class Qwen2Layer(eqx.Module):
    attn_norm: RMSNorm
    attn: Attention
    mlp_norm: RMSNorm
    mlp: MLP


class Qwen2Like(eqx.Module):
    embed: Embedding
    layers: Qwen2Layer
    final_norm: RMSNorm
    lm_head: Linear | None
    num_layers: int = eqx.field(static=True)


def qwen2_like(*, tied: bool, L=2, V=40, D=16, H=4, KV=2, hd=4, F=24, seed=0) -> Qwen2Like:
    rng = np.random.default_rng(seed)

    def a(*shape):
        return jnp.asarray(rng.standard_normal(shape) * 0.1, jnp.float32)

    def lin(o, i, bias):
        return Linear(a(L, o, i), a(L, o) if bias else None)

    layer = Qwen2Layer(
        RMSNorm(a(L, D)),
        Attention(lin(H * hd, D, True), lin(KV * hd, D, True), lin(KV * hd, D, True), lin(D, H * hd, False)),
        RMSNorm(a(L, D)),
        MLP(lin(F, D, False), lin(F, D, False), lin(D, F, False)),
    )
    head = None if tied else Linear(a(V, D), None)
    return Qwen2Like(Embedding(a(V, D)), layer, RMSNorm(a(D)), head, L)


QWEN2_HIDDEN = {
    "layers.attn.q_proj.weight",
    "layers.attn.k_proj.weight",
    "layers.attn.v_proj.weight",
    "layers.attn.o_proj.weight",
    "layers.mlp.gate_proj.weight",
    "layers.mlp.up_proj.weight",
    "layers.mlp.down_proj.weight",
}

NANOGPT_HIDDEN = {
    "layers.attn.c_attn.weight",
    "layers.attn.c_proj.weight",
    "layers.mlp.c_fc.weight",
    "layers.mlp.c_proj.weight",
}


def by_path(tree) -> dict[str, object]:
    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# --------------------------------------------------------------------------------------------------------------
# Newton–Schulz


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
def test_newton_schulz_matches_numpy_reference(shape):
    x = np.random.default_rng(1).standard_normal(shape)
    ref = np_newton_schulz(x)
    got32 = newton_schulz(jnp.asarray(x, jnp.float32), dtype=jnp.float32)
    assert got32.dtype == jnp.float32
    assert rel_err(got32, ref) < 1e-5
    got16 = newton_schulz(jnp.asarray(x, jnp.float32), dtype=jnp.bfloat16)
    assert got16.dtype == jnp.bfloat16
    # bf16 matmuls (as in Keller Jordan's reference) cost a few percent of the direction, not its character.
    assert rel_err(got16.astype(jnp.float32), ref) < 0.1
    # Quintic NS with these coefficients lands singular values in a band around 1 (not exactly 1).
    for out in (ref, np.asarray(got16.astype(jnp.float32))):
        s = np.linalg.svd(out, compute_uv=False)
        assert 0.6 < s.min() and s.max() < 1.25, (s.min(), s.max())
    # Orthogonalisation is scale invariant: the Frobenius normalisation is applied first.
    assert rel_err(newton_schulz(jnp.asarray(1e3 * x, jnp.float32), dtype=jnp.float32), ref) < 1e-5


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
def test_gram_newton_schulz_matches_numpy_reference(shape):
    """Gram NS is the same iteration: in float32 it equals the reference (square shapes take the standard form)."""
    x = np.random.default_rng(1).standard_normal((2, *shape))
    got = newton_schulz(jnp.asarray(x, jnp.float32), dtype=jnp.float32, method="gram")
    assert rel_err(got, np.stack([np_newton_schulz(m) for m in x])) < 1e-5


def power_law_matrix(m: int, n: int, decay: float, seed: int) -> np.ndarray:
    """A gradient-like m×n matrix: singular values (1 + i)^-decay, random singular vectors."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, m)))
    return (u * (1.0 + np.arange(m)) ** -decay) @ v.T


@pytest.mark.parametrize("decay", [1.0, 2.0])
def test_gram_newton_schulz_in_float16_is_closer_to_exact_than_standard_bf16(decay):
    """On ill-conditioned (gradient-like) spectra, float16 Gram NS with its restart lands closer to the float64
    iteration than the bfloat16 standard form does."""
    x = power_law_matrix(128, 768, decay, seed=int(decay))
    ref = np_newton_schulz(x)
    gram = newton_schulz(jnp.asarray(x, jnp.float32), dtype=jnp.float16, method="gram")
    standard = newton_schulz(jnp.asarray(x, jnp.float32), dtype=jnp.bfloat16, method="standard")
    gram_err, standard_err = rel_err(gram.astype(jnp.float32), ref), rel_err(standard.astype(jnp.float32), ref)
    assert gram.dtype == jnp.float16
    assert gram_err < 0.05 and gram_err < standard_err, (gram_err, standard_err)


def test_gram_newton_schulz_restart_keeps_half_precision_stable(monkeypatch):
    """The restart after step 2 is what keeps the float16 recurrence on G accurate (and bfloat16 from blowing up)."""
    x = jnp.asarray(power_law_matrix(128, 768, 2.0, seed=2), jnp.float32)
    ref = np_newton_schulz(np.asarray(x))

    def err(dtype):
        return rel_err(newton_schulz(x, dtype=dtype, method="gram").astype(jnp.float32), ref)

    with_restart = err(jnp.float16)
    monkeypatch.setattr(muon_module, "GRAM_RESTARTS", ())
    assert err(jnp.float16) > 10 * with_restart
    assert err(jnp.bfloat16) > 1.0


@pytest.mark.parametrize("method, dtype", [("gram", jnp.float16), ("standard", jnp.bfloat16)])
def test_newton_schulz_of_a_zero_gradient_is_zero(method, dtype):
    """A layer with no gradient yet (e.g. a frozen or unused one) must give a zero update, not NaN."""
    out = newton_schulz(jnp.zeros((2, 16, 48)), dtype=dtype, method=method)
    assert out.dtype == dtype and not np.asarray(out.astype(jnp.float32)).any()


def test_ns_flops_hand_counted():
    m, n = 1536, 8960  # Qwen2.5-1.5B's MLP matrices
    assert ns_flops(m, n, steps=5, method="standard") == 5 * (4 * m * m * n + 2 * m**3)
    # Steps 1-2: X Xᵀ, G² twice, P·G·P once, P·Q once, Q X; steps 3-5: X Xᵀ, G² ×3, P·G·P ×2, P·Q ×2, Q X.
    assert ns_flops(n, m, steps=5, method="gram") == 8 * m * m * n + 28 * m**3
    assert ns_flops(m, n, steps=5, method="gram") / ns_flops(m, n, steps=5, method="standard") < 0.6
    # Square matrices keep the standard form, where the Gram one would cost more (8 + 28 > 20 + 10 per m³).
    assert ns_flops(m, m, steps=5, method="gram") == ns_flops(m, m, steps=5, method="standard")


def test_newton_schulz_rejects_unknown_method():
    with pytest.raises(ValueError, match="unknown Newton–Schulz method 'fast'"):
        newton_schulz(jnp.ones((4, 8)), method="fast")


def test_ns_auto_settings_follow_the_backend_and_method(monkeypatch):
    auto = OptimizerConfig(name="muon_local")
    assert (auto.resolved_ns_method, auto.resolved_ns_dtype) == ("gram", "float16")  # CPU (and GPU)
    assert OptimizerConfig(name="muon_local", ns_method="standard").resolved_ns_dtype == "bfloat16"
    assert OptimizerConfig(name="muon_local", ns_dtype="float32").resolved_ns_dtype == "float32"
    # TPU matrix units take bfloat16, not float16: auto keeps Keller Jordan's bf16 form there.
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert (auto.resolved_ns_method, auto.resolved_ns_dtype) == ("standard", "bfloat16")
    assert OptimizerConfig(name="muon_local", ns_method="gram").resolved_ns_dtype == "float16"


def test_newton_schulz_is_batched_over_leading_axes():
    x = np.random.default_rng(2).standard_normal((3, 2, 8, 20))
    got = newton_schulz(jnp.asarray(x, jnp.float32), dtype=jnp.float32)
    ref = np.stack([[np_newton_schulz(m) for m in row] for row in x])
    assert rel_err(got, ref) < 1e-5


def test_newton_schulz_rejects_vectors():
    with pytest.raises(ValueError, match="ndim >= 2"):
        newton_schulz(jnp.ones((5,)))


def test_stacked_update_equals_per_layer_updates():
    rng = np.random.default_rng(3)
    grads = [jnp.asarray(rng.standard_normal((4, 12, 20)), jnp.float32) for _ in range(3)]
    tx = scale_by_muon(momentum=BETA, nesterov=True, ns_steps=5, ns_dtype=jnp.float32)
    stacked_state = tx.init(grads[0])
    layer_states = [tx.init(grads[0][i]) for i in range(4)]
    for g in grads:
        stacked, stacked_state = tx.update(g, stacked_state)
        for i in range(4):
            single, layer_states[i] = tx.update(g[i], layer_states[i])
            np.testing.assert_allclose(stacked[i], single, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Muon rules against the NumPy reference and against each other.


def muon_problem(seed=4, steps=4):
    """A stacked wide layer and a stacked tall layer (scale factors 1 and sqrt(3)), and a gradient sequence."""
    rng = np.random.default_rng(seed)
    params = {
        "layers": {
            "wide": jnp.asarray(rng.standard_normal((2, 8, 24)), jnp.float32),
            "tall": jnp.asarray(rng.standard_normal((2, 24, 8)), jnp.float32),
        }
    }
    grads = [
        jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params) for _ in range(steps)
    ]
    return params, grads


def run_updates(cfg: OptimizerConfig, params, grads, *, lr=0.1):
    tx = cfg.build(learning_rate=lr, aux_learning_rate=lr, clip_norm=0.0)
    state = tx.init(params)
    step = jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = step(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out


@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_local_matches_reference(nesterov):
    params, grads = muon_problem()
    cfg = OptimizerConfig(name="muon_local", nesterov=nesterov, weight_decay=0.1, ns_dtype="float32")
    got = run_updates(cfg, params, grads)
    for name in ("wide", "tall"):
        ref = np_muon_updates(
            [g["layers"][name] for g in grads], params["layers"][name], lr=0.1, wd=0.1, nesterov=nesterov
        )
        for u, r in zip(got, ref, strict=True):
            assert rel_err(u["layers"][name], r) < 1e-5


@pytest.mark.parametrize("method", ["gram", "standard"])
def test_muon_local_half_precision_newton_schulz_is_close_to_f32(method):
    params, grads = muon_problem(steps=2)
    f32 = run_updates(OptimizerConfig(name="muon_local", ns_method=method, ns_dtype="float32"), params, grads)
    half = run_updates(OptimizerConfig(name="muon_local", ns_method=method), params, grads)  # float16 / bfloat16
    for a, b in zip(half, f32, strict=True):
        for name in ("wide", "tall"):
            assert a["layers"][name].dtype == jnp.float32
            assert rel_err(a["layers"][name], b["layers"][name]) < 0.1


def test_muon_optax_without_nesterov_equals_muon_local():
    """Without Nesterov, optax's bias correction is a scalar that NS removes: both rules agree at every step,
    including the shape scale sqrt(max(1, out/in)) and decoupled weight decay -lr*wd*W."""
    params, grads = muon_problem()
    kw = dict(nesterov=False, weight_decay=0.1)
    local = run_updates(OptimizerConfig(name="muon_local", ns_dtype="float32", **kw), params, grads)
    ours_optax = run_updates(OptimizerConfig(name="muon_optax", **kw), params, grads)
    for a, b in zip(local, ours_optax, strict=True):
        for name in ("wide", "tall"):
            assert rel_err(a["layers"][name], b["layers"][name]) < 1e-5


def test_muon_optax_nesterov_is_bias_corrected():
    """With Nesterov the first update agrees (both directions ∝ G_1); later ones follow optax's bias-corrected mix
    β·M/(1-β^(t+1)) + (1-β)·G/(1-β^t), which differs from Keller Jordan's β·M + (1-β)·G."""
    params, grads = muon_problem()
    local = run_updates(OptimizerConfig(name="muon_local", ns_dtype="float32"), params, grads)
    opt = run_updates(OptimizerConfig(name="muon_optax"), params, grads)
    for name in ("wide", "tall"):
        seq = [g["layers"][name] for g in grads]
        ref_optax = np_muon_updates(
            seq, params["layers"][name], lr=0.1, wd=0.0, nesterov=True, optax_bias_correction=True
        )
        for t, (a, b, r) in enumerate(zip(local, opt, ref_optax, strict=True)):
            assert rel_err(b["layers"][name], r) < 1e-5
            if t == 0:
                assert rel_err(a["layers"][name], b["layers"][name]) < 1e-5
            else:  # a real, documented difference, far above float error
                assert rel_err(a["layers"][name], b["layers"][name]) > 1e-3


def test_optax_dimension_numbers_batch_the_layer_axis():
    """Our dimension numbers on [L, out, in] equal optax's default 2-D rule applied per layer to Wᵀ (in, out)."""
    rng = np.random.default_rng(5)
    g = jnp.asarray(rng.standard_normal((3, 24, 8)), jnp.float32)  # tall: out/in = 3, so the scale matters
    stacked_tx = optax.contrib.muon(1.0, muon_weight_dimension_numbers=DIMENSION_NUMBERS)
    stacked, _ = stacked_tx.update(g, stacked_tx.init(g), g)
    plain_tx = optax.contrib.muon(1.0)  # default: 2-D (in, out) matrices
    for i in range(3):
        gi = g[i].T
        single, _ = plain_tx.update(gi, plain_tx.init(gi), gi)
        np.testing.assert_allclose(stacked[i], single.T, rtol=1e-5, atol=1e-6)
    # Swapped axes would scale by sqrt(max(1, in/out)) = 1 instead of sqrt(3).
    np.testing.assert_allclose(stacked, -np_muon_direction(np.asarray(g), eps=1e-8), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Routing, weight-decay masks, learning-rate groups


@pytest.mark.parametrize("tied", [True, False])
def test_routing_of_every_qwen2_parameter(tied):
    model = qwen2_like(tied=tied)
    labels = by_path(label_params(model))
    decay = by_path(decay_mask(model))
    expected_paths = QWEN2_HIDDEN | {
        "embed.weight",
        "final_norm.weight",
        "layers.attn_norm.weight",
        "layers.mlp_norm.weight",
        "layers.attn.q_proj.bias",
        "layers.attn.k_proj.bias",
        "layers.attn.v_proj.bias",
    }
    if not tied:
        expected_paths |= {"lm_head.weight"}
    assert set(labels) == expected_paths
    for path, label in labels.items():
        assert label == ("muon" if path in QWEN2_HIDDEN else "adamw"), path
    # Decay: every matrix (hidden, embed, head); never norms or biases, though stacked ones are 2-D arrays.
    matrices = QWEN2_HIDDEN | {"embed.weight", "lm_head.weight"}
    for path, d in decay.items():
        assert d == (path in matrices), path


def test_routing_of_nanogpt_shaped_dict():
    L, D, T, V = 2, 8, 16, 11
    z = np.zeros
    params = {
        "wte": z((V, D)),
        "wpe": z((T, D)),
        "layers": {
            "ln_1": {"weight": z((L, D)), "bias": z((L, D))},
            "attn": {"c_attn": {"weight": z((L, 3 * D, D)), "bias": z((L, 3 * D))}, "c_proj": {"weight": z((L, D, D))}},
            "ln_2": {"weight": z((L, D))},
            "mlp": {"c_fc": {"weight": z((L, 4 * D, D))}, "c_proj": {"weight": z((L, D, 4 * D))}},
        },
        "ln_f": {"weight": z((D,))},
    }
    labels = by_path(label_params(params))
    assert {p for p, lab in labels.items() if lab == "muon"} == NANOGPT_HIDDEN
    decayed = {p for p, d in by_path(decay_mask(params)).items() if d}
    assert decayed == NANOGPT_HIDDEN | {"wte", "wpe"}
    # A 3-D array outside `layers` is not a hidden matrix.
    assert label_params({"extra": z((2, 3, 4))}) == {"extra": "adamw"}


def test_routing_of_real_qwen2():
    cfg = tiny_qwen2(
        hidden_size=16, intermediate_size=24, tie_word_embeddings=False, compute_dtype="bfloat16", remat="full"
    )
    # Shapes only (routing never reads values): also proves routing works on abstract trees.
    params = eqx.filter_eval_shape(Qwen2.init, cfg, key=jax.random.key(0))
    reference = qwen2_like(tied=False, L=2, V=64, D=16, H=4, KV=2, hd=4, F=24)
    # Same paths and shapes as the contract-shaped mirror, hence the same routing and decay.
    assert {p: np.shape(x) for p, x in by_path(params).items()} == {
        p: np.shape(x) for p, x in by_path(reference).items()
    }
    assert by_path(label_params(params)) == by_path(label_params(reference))
    assert by_path(decay_mask(params)) == by_path(decay_mask(reference))


def test_routing_of_real_nanogpt():
    cfg = GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=8, bias=True)
    params = eqx.filter_eval_shape(GPT.init, cfg, key=jax.random.key(0))
    labels = by_path(label_params(params))
    assert {p for p, lab in labels.items() if lab == "muon"} == NANOGPT_HIDDEN
    decayed = {p for p, d in by_path(decay_mask(params)).items() if d}
    assert decayed == NANOGPT_HIDDEN | {"wte", "wpe"}


def test_routing_table_lists_every_parameter():
    model = qwen2_like(tied=False)
    table = routing_table(model, optimizer="muon_local")
    lines = table.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[2:-1]}
    assert set(rows) == set(by_path(model))
    assert rows["layers.mlp.down_proj.weight"][-3:] == ["muon", "lr", "yes"]
    assert rows["layers.attn.q_proj.bias"][-3:] == ["adamw", "aux_lr", "no"]
    assert rows["embed.weight"][-3:] == ["adamw", "aux_lr", "yes"]
    n_muon = sum(int(np.size(x)) for p, x in by_path(model).items() if p in QWEN2_HIDDEN)
    assert f"muon: {n_muon:,} params" in lines[-1]
    adamw_rows = [line.split() for line in routing_table(model, optimizer="adamw").splitlines()[2:-1]]
    assert all(r[-3:-1] == ["adamw", "lr"] for r in adamw_rows)


@pytest.mark.parametrize("name", ["adamw", "muon_local", "muon_optax"])
def test_weight_decay_and_learning_rate_groups(name):
    """With zero grads every update is pure decoupled decay: W ← W·(1 - lr·wd) on matrices, at the group's LR and
    decay; norms and biases stay put."""
    model = qwen2_like(tied=False)
    params = eqx.filter(model, eqx.is_array)
    lr, aux_lr, wd, aux_wd = 0.1, 0.01, 0.5, 0.2
    cfg = OptimizerConfig(name=name, weight_decay=wd, aux_weight_decay=aux_wd)
    tx = cfg.build(learning_rate=lr, aux_learning_rate=aux_lr, clip_norm=1.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = by_path(eqx.apply_updates(params, updates))
    matrices = QWEN2_HIDDEN | {"embed.weight", "lm_head.weight"}
    for path, p in by_path(params).items():
        if path not in matrices:
            factor = 1.0
        elif name == "adamw" or path in QWEN2_HIDDEN:
            factor = 1 - lr * wd
        else:
            factor = 1 - aux_lr * aux_wd
        np.testing.assert_allclose(new[path], np.asarray(p) * factor, rtol=1e-6, err_msg=path)


def test_muon_state_lives_only_on_hidden_matrices():
    params = eqx.filter(qwen2_like(tied=True), eqx.is_array)
    for name in ("muon_local", "muon_optax"):
        state = OptimizerConfig(name=name).build(learning_rate=1.0, aux_learning_rate=1.0, clip_norm=0.0).init(params)
        muon_state = state[-1].inner_states["muon"]
        n_muon = sum(x.size for x in jax.tree.leaves(muon_state) if x.ndim == 3)
        n_hidden = sum(x.size for p, x in by_path(params).items() if p in QWEN2_HIDDEN)
        assert n_muon == n_hidden, name


# --------------------------------------------------------------------------------------------------------------
# Clipping, dtypes, convergence


def test_global_norm_clipping_happens_first():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    # bf16 grads: the norm must still be computed in f32 (bf16 would round sqrt(208) by ~1e-3).
    grads = {"w": jnp.full((4, 4), 3.0, jnp.bfloat16), "b": jnp.full((4,), 4.0, jnp.bfloat16)}
    norm = float(np.sqrt(16 * 9 + 4 * 16))
    for clip, scale in ((1.0, 1.0 / norm), (0.0, 1.0), (1e6, 1.0)):
        tx = OptimizerConfig(name="adamw").build(learning_rate=0.1, aux_learning_rate=0.1, clip_norm=clip)
        _, state = tx.update(grads, tx.init(params), params)
        mu = optax.tree_utils.tree_get(state, "mu")
        np.testing.assert_allclose(mu["w"], 0.1 * 3.0 * scale, rtol=1e-6)  # (1 - b1) · clipped grad
        np.testing.assert_allclose(mu["b"], 0.1 * 4.0 * scale, rtol=1e-6)
    with pytest.raises(ValueError, match="clip_norm"):
        OptimizerConfig().build(learning_rate=0.1, aux_learning_rate=0.1, clip_norm=-1.0)


def least_squares():
    """A stacked-layer regression plus 'embedding' and 'norm' targets: loss 0 at a known optimum."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((2, 16, 64)), jnp.float32)
    w_true = jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)
    y = w_true @ x
    params = {
        "embed": jnp.zeros((10, 8), jnp.float32),
        "layers": {"w": jnp.zeros((2, 8, 16), jnp.float32), "b": jnp.zeros((2, 8), jnp.float32)},
        "norm": jnp.zeros((8,), jnp.float32),
    }
    e_true, n_true = jnp.ones((10, 8)), jnp.full((8,), 0.5)

    def loss(p):
        pred = p["layers"]["w"] @ x + p["layers"]["b"][..., None]
        return jnp.mean((pred - y) ** 2) + jnp.mean((p["embed"] - e_true) ** 2) + jnp.mean((p["norm"] - n_true) ** 2)

    return params, loss


@pytest.mark.parametrize("name", ["adamw", "muon_local", "muon_optax"])
def test_optimizers_reduce_least_squares_with_f32_state(name):
    params, loss = least_squares()
    tx = OptimizerConfig(name=name).build(
        learning_rate=make_schedule(0.2, warmup_steps=2, total_steps=60, kind="cosine", min_lr_ratio=0.0),
        aux_learning_rate=0.05,
        clip_norm=1.0,
    )
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        g = jax.tree.map(lambda x: x.astype(jnp.bfloat16), g)  # bf16 grads must not leak into state or updates
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, value, u

    first = float(loss(params))
    for _ in range(60):
        params, state, _, updates = step(params, state)
    assert float(loss(params)) < 0.05 * first
    assert all(u.dtype == jnp.float32 for u in jax.tree.leaves(updates))
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)


# --------------------------------------------------------------------------------------------------------------
# Schedules


def test_schedule_exact_values():
    peak, w, T = 1e-3, 4, 20
    lin = make_schedule(peak, warmup_steps=w, total_steps=T, kind="linear", min_lr_ratio=0.1)
    cos = make_schedule(peak, warmup_steps=w, total_steps=T, kind="cosine", min_lr_ratio=0.1)
    const = make_schedule(peak, warmup_steps=w, total_steps=T, kind="constant", min_lr_ratio=0.1)
    for s in (lin, cos, const):
        assert float(s(0)) == pytest.approx(peak / 5, rel=1e-6)  # first update is not 0
        assert float(s(3)) == pytest.approx(peak * 4 / 5, rel=1e-6)
        assert float(s(4)) == pytest.approx(peak, rel=1e-6)  # end of warmup
    assert float(lin(12)) == pytest.approx(peak * (1 - 0.9 * 8 / 16), rel=1e-6)
    assert float(lin(19)) == pytest.approx(peak * (1 - 0.9 * 15 / 16), rel=1e-6)  # last update
    assert float(cos(12)) == pytest.approx(peak * 0.55, rel=1e-6)  # halfway: (min + peak) / 2
    assert float(cos(19)) == pytest.approx(peak * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 15 / 16))), rel=1e-5)
    for s in (lin, cos):
        assert float(s(20)) == pytest.approx(peak * 0.1, rel=1e-6)
        assert float(s(1000)) == pytest.approx(peak * 0.1, rel=1e-6)
    assert float(const(19)) == pytest.approx(peak, rel=1e-6)
    assert float(const(1000)) == pytest.approx(peak, rel=1e-6)


def test_schedule_without_warmup_starts_at_peak_and_never_hits_zero_early():
    s = make_schedule(3e-3, warmup_steps=0, total_steps=10, kind="linear", min_lr_ratio=0.0)
    values = np.array([float(s(t)) for t in range(10)])
    np.testing.assert_allclose(values, 3e-3 * (1 - np.arange(10) / 10), rtol=1e-6)
    assert values.min() > 0
    # Inside jit, with optax's int32 counter.
    assert float(jax.jit(s)(jnp.int32(5))) == pytest.approx(1.5e-3, rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(warmup_steps=11, total_steps=10),
        dict(warmup_steps=-1, total_steps=10),
        dict(total_steps=0),
        dict(min_lr_ratio=1.5),
        dict(kind="step"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs):
    args = dict(warmup_steps=0, total_steps=10, kind="linear", min_lr_ratio=0.0) | kwargs
    with pytest.raises(ValueError):
        make_schedule(1e-3, **args)


def test_config_rejects_bad_values():
    for bad in (dict(momentum=1.0), dict(beta2=1.5), dict(ns_steps=0), dict(eps=0.0), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError):
            OptimizerConfig(**bad)
    with pytest.raises(ValueError, match="unknown optimizer"):
        OptimizerConfig(name="sgd").build(learning_rate=1.0, aux_learning_rate=1.0, clip_norm=0.0)
