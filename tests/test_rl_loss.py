"""The GRPO loss family and its gradient against a NumPy float64 reference on hand-made groups; the completion
log-probs of grouped rows (each prompt once, packed or not) against a float64 log-softmax of the model's own logits
over separate unpadded rows, and their gradient against the separate rows'."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_beam import EOS, _catalog, _model, _prompts

from sid.rl.advantages import group_advantages
from sid.rl.loss import completion_logprobs, grpo_loss, k3_kl
from sid.rl.rollout import group_rows
from sid.rl.source import left_pad

BETA = 0.04  # larger than upstream's 1e-3 so the KL term visibly moves the loss and the gradient


def _reference(logp, ref, old, mask, adv, kind, eps):
    """float64 loss, written from the recipe (docs/rl.md); `old` is a constant (the stop-gradient)."""
    kl = np.exp(ref - logp) - (ref - logp) - 1
    length = mask.sum(1)

    def surrogate(ratio, a):
        return ratio * a if eps is None else np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)

    if kind == "sequence":
        ratio = np.exp(((logp - old) * mask).sum(1) / length)
        return np.mean(-(surrogate(ratio, adv) - BETA * (kl * mask).sum(1) / length))
    per_token = -(surrogate(np.exp(logp - old), adv[:, None]) - BETA * kl)
    if kind == "grpo":
        return np.mean((per_token * mask).sum(1) / length)
    return (per_token * mask).sum() / mask.sum()


def _numeric_grad(f, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def _groups():
    """Two prompts x 3 completions of 1..4 tokens; ref and old log-probs near the policy's."""
    rng = np.random.default_rng(0)
    logp = -rng.uniform(0.05, 3.0, size=(6, 4))
    ref = logp + rng.normal(0, 0.3, size=logp.shape)
    old = logp + rng.choice([-1, 1], size=logp.shape) * rng.uniform(0.02, 0.4, size=logp.shape)
    mask = np.arange(4)[None, :] < np.array([4, 3, 2, 4, 1, 4])[:, None]
    adv = group_advantages(np.array([[1.0, 0.0, -0.25], [0.0, 1.0, 1.0]])).reshape(-1)
    return logp, ref, old, mask, adv


def _jax_loss(logp, ref, old, mask, adv, kind, eps):
    loss_sum, count, stats = grpo_loss(
        logp, jnp.asarray(ref, jnp.float32), old, jnp.asarray(mask), jnp.asarray(adv, jnp.float32),
        beta=BETA, kind=kind, clip_eps=eps,
    )  # fmt: skip
    return loss_sum / count.astype(jnp.float32), stats


@pytest.mark.parametrize("kind", ["grpo", "token_mean", "sequence"])
@pytest.mark.parametrize("with_old,eps", [(False, None), (False, 0.2), (True, None), (True, 0.2)])
def test_loss_and_gradient_match_float64_reference(kind, with_old, eps):
    logp, ref, old, mask, adv = _groups()
    old_jax = jnp.asarray(old, jnp.float32) if with_old else None
    (loss, stats), grad = jax.value_and_grad(_jax_loss, has_aux=True)(
        jnp.asarray(logp, jnp.float32), ref, old_jax, mask, adv, kind, eps
    )
    # Without stored old log-probs the ratio's denominator is the policy's own log-prob, held constant.
    fixed_old = old if with_old else logp
    expected = _reference(logp, ref, fixed_old, mask, adv, kind, eps)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
    expected_grad = _numeric_grad(lambda x: _reference(x, ref, fixed_old, mask, adv, kind, eps), logp)
    np.testing.assert_allclose(np.asarray(grad), expected_grad, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(grad)[~mask] == 0)  # padding tokens get no gradient

    kl = np.exp(ref - logp) - (ref - logp) - 1
    np.testing.assert_allclose(float(stats["kl_sum"]), ((kl * mask).sum(1) / mask.sum(1)).sum(), rtol=1e-5)
    assert int(stats["completions"]) == 6 and int(stats["completion_tokens"]) == mask.sum()
    ratio = np.exp(logp - fixed_old)
    if kind == "sequence":
        ratio, units = np.exp(((logp - fixed_old) * mask).sum(1) / mask.sum(1)), np.ones(6, bool)
        a = adv
    else:
        units, a = mask, np.broadcast_to(adv[:, None], mask.shape)
    assert int(stats["ratio_units"]) == units.sum()
    np.testing.assert_allclose(float(stats["ratio_sum"]), ratio[units].sum(), rtol=1e-5)
    clipped = 0 if eps is None else int((np.clip(ratio, 1 - eps, 1 + eps) * a < ratio * a)[units].sum())
    assert int(stats["clipped"]) == clipped
    if with_old and eps is not None and kind != "sequence":
        assert 0 < clipped < units.sum()  # the case exercises both sides of the clip


@pytest.mark.parametrize("kind", ["grpo", "token_mean", "sequence"])
def test_filler_rows_are_left_out(kind):
    """Rows without completion tokens (batch filler) change nothing, even holding -inf log-probs and NaN advantages;
    masked tokens of real rows may hold -inf too."""
    logp, ref, old, mask, adv = _groups()
    logp[~mask], ref[~mask] = -np.inf, -np.inf
    filled = [np.concatenate([x, np.full((2, 4), -np.inf)]) for x in (logp, ref, old)]
    filled_mask = np.concatenate([mask, np.zeros((2, 4), bool)])
    filled_adv = np.concatenate([adv, [np.nan, 5.0]])

    def run(lp, rf, od, mk, ad):
        return jax.value_and_grad(_jax_loss, has_aux=True)(
            jnp.asarray(lp, jnp.float32), rf, jnp.asarray(od), mk, ad, kind, 0.2
        )

    (loss, stats), grad = run(logp, ref, old, mask, adv)
    (filled_loss, filled_stats), filled_grad = run(*filled, filled_mask, filled_adv)
    assert np.isfinite(float(loss)) and float(filled_loss) == pytest.approx(float(loss), rel=1e-6)
    np.testing.assert_allclose(np.asarray(filled_grad[:6]), np.asarray(grad), rtol=1e-6, atol=1e-9)
    assert np.all(np.asarray(filled_grad)[~filled_mask] == 0)
    for name, value in stats.items():
        assert float(filled_stats[name]) == pytest.approx(float(value), rel=1e-6), name


def test_hand_computed_reductions_and_zero_kl():
    """ref == policy: KL 0, ratio 1, so the loss is minus the advantages averaged per each reduction's weights."""
    logp = jnp.asarray([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    mask = jnp.asarray([[True, True, True], [True, False, False]])
    adv = jnp.asarray([1.0, -0.5])
    expected = {"grpo": -(1.0 - 0.5) / 2, "token_mean": -(3 * 1.0 - 0.5) / 4, "sequence": -(1.0 - 0.5) / 2}
    for kind, value in expected.items():
        loss_sum, count, stats = grpo_loss(logp, logp, None, mask, adv, beta=0.5, kind=kind)
        assert float(loss_sum / count.astype(jnp.float32)) == pytest.approx(value, abs=1e-7)
        assert float(stats["kl_sum"]) == 0.0
    np.testing.assert_array_equal(np.asarray(k3_kl(logp, logp)), 0.0)
    assert float(k3_kl(jnp.asarray(-1.0), jnp.asarray(-2.0))) == pytest.approx(np.exp(-1) + 1 - 1, abs=1e-7)
    with pytest.raises(ValueError, match="unknown GRPO loss kind 'dapo'"):
        grpo_loss(logp, logp, None, mask, adv, beta=0.0, kind="dapo")


def _separate_rows(prompts, completions):
    """The oracle's layout: every (prompt, completion) pair as its own row, right-padded (segment 0 after the
    tokens, positions from 0), as a model that knows nothing of groups would see it."""
    num_prompts, group, num_tokens = completions.shape
    width = max(map(len, prompts)) + num_tokens
    ids, segments = np.zeros((num_prompts * group, width), np.int32), np.zeros((num_prompts * group, width), np.int32)
    for p, prompt in enumerate(prompts):
        for g in range(group):
            ids[p * group + g, : len(prompt) + num_tokens] = prompt + completions[p, g].tolist()
            segments[p * group + g, : len(prompt) + num_tokens] = 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape)
    return ids, positions, segments


def _separate_logprobs(model, prompts, completions):
    """f32 log-probs of each completion from `_separate_rows` and the model's own logits, [P, G, T]."""
    num_prompts, group, num_tokens = completions.shape
    logits = model.logits(model(*map(jnp.asarray, _separate_rows(prompts, completions))))
    starts = np.repeat([len(p) - 1 for p in prompts], group)  # the position that predicts the first token
    at = jnp.take_along_axis(logits, jnp.asarray(starts[:, None, None] + np.arange(num_tokens)[:, None]), axis=1)
    logp = jax.nn.log_softmax(at, axis=-1)
    flat = completions.reshape(-1, num_tokens)
    return jnp.take_along_axis(logp, jnp.asarray(flat)[..., None], axis=-1)[..., 0].reshape(completions.shape)


@pytest.fixture(scope="module", params=[(True, 1), (True, 2), (False, 2)], ids=["packed", "2-cells", "one-per-row"])
def grouped(request):
    """Five prompts of different lengths with four catalog completions each, in `group_rows`' layout; padded to
    three times their bucket, so that packing puts several groups in a row: (prompts, rows, each prompt's
    completions [P, G, T], a function of the batch's [cells, groups, ...] values giving each prompt's)."""
    pack, cells = request.param
    trie = _catalog((4, 3, 3), 22, seed=1)
    prompts, ids, _ = _prompts(5, seed=3)
    ids, mask = left_pad(prompts, 3 * ids.shape[1], EOS)
    leaves = np.random.default_rng(4).integers(0, trie.num_leaves, size=(5, 4))
    rows, plan = group_rows(trie, ids, mask, leaves, pack=pack, cells=cells)
    assert plan.cells == cells and (plan.rows < plan.groups) == pack

    def per_prompt(x):
        return x[plan.cell, plan.slot]

    return prompts, rows, per_prompt(rows["completions"]), per_prompt


def test_completion_logprobs_match_float64_logits_of_separate_rows(grouped):
    """The grouped forward (each prompt once, completions attending to it; several prompts per row when packed)
    against every [prompt | completion] as its own unpadded row: the same log-probs, within f32 noise of a float64
    log-softmax of the model's logits."""
    model = _model(seed=1)
    prompts, rows, completions, per_prompt = grouped
    got = np.asarray(jax.jit(completion_logprobs)(model, rows))
    assert got.dtype == np.float32 and got.shape == rows["completions"].shape
    got = per_prompt(got)
    ids, positions, segments = _separate_rows(prompts, completions)
    logits = np.asarray(jax.jit(lambda m, *a: m.logits(m(*a)))(model, ids, positions, segments), np.float64)
    for p, prompt in enumerate(prompts):
        for g in range(4):
            at = logits[p * 4 + g, len(prompt) - 1 : len(prompt) + 4]  # the positions predicting the completion
            top = at.max(-1, keepdims=True)
            logp = at - top - np.log(np.exp(at - top).sum(-1, keepdims=True))
            np.testing.assert_allclose(got[p, g], logp[np.arange(5), completions[p, g]], rtol=0, atol=2e-5)


def test_completion_logprobs_gradient_matches_separate_rows(grouped):
    """The gradient through the shared prompt (its hidden states feed G completions) is the sum of the separate
    rows' gradients: a weighted sum of the log-probs, differentiated both ways."""
    model = _model(seed=1)
    prompts, rows, completions, per_prompt = grouped
    weights = jnp.asarray(np.random.default_rng(5).normal(size=completions.shape), jnp.float32)

    def grouped_sum(m):
        return (weights * per_prompt(completion_logprobs(m, rows))).sum()

    def separate_sum(m):
        return (weights * _separate_logprobs(m, prompts, completions)).sum()

    got, want = (eqx.filter_jit(eqx.filter_grad(f))(model) for f in (grouped_sum, separate_sum))
    got, want = (jax.tree.leaves(eqx.filter(g, eqx.is_array)) for g in (got, want))
    scale = max(float(jnp.abs(w).max()) for w in want)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4 * scale)
