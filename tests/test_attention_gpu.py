"""cuDNN fused attention against XLA on a GPU: the same hidden states, gradients and cached decoding for packed,
right- and left-padded rows, and `attention: auto` really lowering to cuDNN. Skipped without a GPU backend
(`make test-gpu` runs them on a GPU machine); on CPU, test_qwen2.py covers the masks against separate runs."""

import dataclasses
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_qwen2

from sid.models.qwen2 import Qwen2

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU backend: make test-gpu"),
]

# head_dim 64 (cuDNN's flash path takes up to 128), GQA 2:1, bf16 compute as in training.
CFG = tiny_qwen2(vocab_size=512, hidden_size=256, intermediate_size=512, init_std=0.05, compute_dtype="bfloat16")


def _with(model: Qwen2, attention: str) -> Qwen2:
    return dataclasses.replace(model, config=dataclasses.replace(model.config, attention=attention))


@pytest.fixture(scope="module")
def model() -> Qwen2:
    return eqx.filter_jit(Qwen2.init)(CFG, key=jax.random.key(0))


def _batch(seq: int = 128):
    """Row 0: two packed samples then right padding; row 1: one full sample; row 2: left padding."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CFG.vocab_size, (3, seq)).astype(np.int32)
    segments = np.zeros((3, seq), np.int32)
    segments[0, :50], segments[0, 50:100] = 1, 2
    segments[1] = 1
    segments[2, 40:] = 1
    positions = np.zeros((3, seq), np.int32)
    for r in range(3):
        for s in (1, 2):
            where = np.flatnonzero(segments[r] == s)
            positions[r, where] = np.arange(len(where))
    return jnp.asarray(ids), jnp.asarray(positions), jnp.asarray(segments)


@eqx.filter_jit
def _loss(model: Qwen2, ids, positions, segments):
    logp = jax.nn.log_softmax(model.logits(model(ids, positions, segments))[:, :-1])
    nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    weight = (segments[:, 1:] > 0) & (segments[:, 1:] == segments[:, :-1])
    return jnp.sum(nll * weight) / jnp.sum(weight)


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def test_auto_lowers_to_cudnn_and_xla_does_not(model):
    ids, positions, segments = _batch()
    hlo = {
        name: eqx.filter_jit(lambda m: m(ids, positions, segments)).lower(_with(model, name)).as_text()
        for name in ("auto", "xla", "cudnn")
    }
    assert "cudnn$fmha" in hlo["auto"] and "cudnn$fmha" in hlo["cudnn"]
    assert "cudnn$fmha" not in hlo["xla"]


def test_cudnn_hidden_states_and_gradients_equal_xla(model):
    ids, positions, segments = _batch()
    real = np.asarray(segments) > 0
    hidden = {
        name: np.asarray(eqx.filter_jit(lambda m: m(ids, positions, segments))(_with(model, name)), np.float32)
        for name in ("xla", "cudnn")
    }
    # Padding queries' outputs are never used; every real token must agree to bf16 precision.
    assert _rel_err(hidden["cudnn"][real], hidden["xla"][real]) < 1e-2
    grads = {
        name: eqx.filter_jit(eqx.filter_value_and_grad(_loss))(_with(model, name), ids, positions, segments)
        for name in ("xla", "cudnn")
    }
    assert abs(float(grads["cudnn"][0]) - float(grads["xla"][0])) < 1e-2
    for g, ref in zip(jax.tree.leaves(grads["cudnn"][1]), jax.tree.leaves(grads["xla"][1]), strict=True):
        assert np.isfinite(np.asarray(g)).all()
        assert _rel_err(g, ref) < 3e-2
    # A mask bug would change the loss by far more than the tolerance: packing without segments differs.
    unpacked = _loss(_with(model, "cudnn"), ids, positions, jnp.where(segments > 0, 1, 0))
    assert abs(float(unpacked) - float(grads["cudnn"][0])) > 1e-2


def test_cudnn_prefill_and_decode_equal_xla(model):
    rng = np.random.default_rng(1)
    width, num_beams, steps = 64, 8, 3
    lengths = np.array([64, 20, 45])
    mask = np.arange(width)[None] >= (width - lengths)[:, None]
    ids = jnp.asarray(np.where(mask, rng.integers(0, CFG.vocab_size, (3, width)), 0), jnp.int32)
    positions = jnp.asarray(np.maximum(np.cumsum(mask, 1) - 1, 0), jnp.int32)
    tokens = jnp.asarray(rng.integers(0, CFG.vocab_size, (steps, 3, num_beams)), jnp.int32)

    @eqx.filter_jit
    def run(m: Qwen2):
        hidden, prefix = m.prefill(ids, positions, jnp.asarray(mask))
        suffix, out = m.init_suffix_cache(3, num_beams, steps), [m.logits(hidden)]
        for t in range(steps):
            pos = jnp.broadcast_to(jnp.asarray(lengths + t, jnp.int32)[:, None], (3, num_beams))
            hidden, suffix = m.decode(tokens[t], pos, prefix, suffix)
            out.append(m.logits(hidden))
        return out

    for got, ref in zip(run(_with(model, "cudnn")), run(_with(model, "xla")), strict=True):
        assert _rel_err(got, ref) < 2e-2  # bf16 logits after 2 layers; a mask bug gives O(1)


def test_dots_remat_keeps_cudnn_attention_outputs_instead_of_rerunning_the_forward(model):
    """Under remat 'dots' the backward pass must not rerun cuDNN's attention forward: the policy saves its output and
    softmax statistics (sid.models.layers.FUSED_ATTENTION_FORWARD). With remat 'full' it does rerun it."""
    ids, positions, segments = _batch()

    def fmha_calls(remat: str) -> tuple[int, int]:
        m = dataclasses.replace(model, config=dataclasses.replace(model.config, attention="cudnn", remat=remat))
        grad = eqx.filter_jit(eqx.filter_grad(_loss))
        hlo = grad.lower(m, ids, positions, segments).compile().compiled.as_text()
        targets = re.findall(r'custom_call_target="(__cudnn\$fmha[A-Za-z]*)"', hlo)
        backward = sum("Backward" in t for t in targets)
        return len(targets) - backward, backward

    forward, backward = fmha_calls("dots")
    assert backward > 0 and forward == backward, (forward, backward)
    forward, backward = fmha_calls("full")  # the control: the check can see a rerun forward
    assert forward == 2 * backward, (forward, backward)
