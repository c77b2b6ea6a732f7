"""Constrained sampling on a tiny random Qwen2 and catalog: every draw is a catalog SID scored like the exhaustive
forward; a tiny temperature is greedy (beam search with one beam); first-level codes are drawn with the model's
constrained, tempered softmax probabilities; an 8-device mesh draws the same samples as one device."""

import functools

import jax
import numpy as np
import pytest
from test_beam import _catalog, _exhaustive, _model, _prompts

from sid.config import MeshConfig
from sid.eval.beam import beam_search
from sid.eval.sampling import constrained_sample, sharded_constrained_sample
from sid.parallel.mesh import make_mesh
from sid.parallel.rules import param_shardings

CHI2_DF3_P1E4 = 21.1075  # chi-square critical value, 3 degrees of freedom (4 first-level codes), p = 1e-4


@functools.cache
def _sampler(num_samples: int, temperature: float):
    return jax.jit(functools.partial(constrained_sample, num_samples=num_samples, temperature=temperature))


@pytest.fixture(scope="module")
def setup():
    model = _model()
    trie = _catalog((4, 3, 3), 22, seed=1)
    prompts, ids, mask = _prompts(8, seed=2)
    return model, trie, prompts, ids, mask


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_samples_are_catalog_sids_scored_like_the_exhaustive_forward(setup, temperature):
    model, trie, prompts, ids, mask = setup
    out = _sampler(48, temperature)(model, trie.tables, ids, mask, jax.random.key(0))
    tokens, scores, leaves = (np.asarray(x) for x in out)
    assert tokens.shape == (8, 48, 3) and scores.shape == leaves.shape == (8, 48)
    assert leaves.min() >= 0 and leaves.max() < trie.num_leaves
    np.testing.assert_array_equal(tokens, trie.paths[leaves])  # the tokens spell a catalog SID: the leaf's
    oracle = _exhaustive(model, prompts, trie)
    np.testing.assert_allclose(scores, np.take_along_axis(oracle, leaves, axis=1), rtol=0, atol=1e-5)
    assert len(np.unique(leaves)) > trie.num_leaves // 2  # the draws explore the catalog
    again = _sampler(48, temperature)(model, trie.tables, ids, mask, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(again.leaves), leaves)  # a key fixes the draws
    other = _sampler(48, temperature)(model, trie.tables, ids, mask, jax.random.key(1))
    assert not np.array_equal(np.asarray(other.leaves), leaves)


def test_tiny_temperature_is_greedy(setup):
    model, trie, _, ids, mask = setup
    out = _sampler(4, 1e-6)(model, trie.tables, ids, mask, jax.random.key(2))
    greedy = jax.jit(beam_search, static_argnames="num_beams")(model, trie.tables, ids, mask, num_beams=1)
    np.testing.assert_array_equal(np.asarray(out.leaves), np.repeat(np.asarray(greedy.leaves), 4, axis=1))
    np.testing.assert_allclose(np.asarray(out.scores), np.repeat(np.asarray(greedy.scores), 4, axis=1), atol=1e-5)


def _first_level_probs(model, trie, ids, mask, temperature: float) -> np.ndarray:
    """float64 [batch, first-level codes]: softmax(logits / T) over the catalog's first-level codes only."""
    mask = mask.astype(bool)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    hidden = jax.jit(lambda m, *a: m.logits(m(*a)))(model, ids, positions, mask.astype(np.int32))
    codes = np.unique(trie.paths[:, 0])
    logits = np.asarray(hidden, np.float64)[:, -1, codes] / temperature
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)


def test_first_level_codes_follow_the_constrained_softmax(setup):
    """3,072 draws for each of two prompts (4 copies of each in a batch of 8 x 48 samples, 16 keys)."""
    model, trie, _, ids, mask = setup
    rows = np.repeat([0, 1], 4)
    ids, mask = ids[rows], mask[rows]
    codes = np.unique(trie.paths[:, 0])
    expected = {t: _first_level_probs(model, trie, ids[::4], mask[::4], t) for t in (1.0, 2.0)}
    # The check can fail: the temperature moves some probability by far more than the sampling noise.
    assert np.abs(expected[1.0] - expected[2.0]).max() > 0.05
    for temperature, probs in expected.items():
        sample = _sampler(48, temperature)
        leaves = [np.asarray(sample(model, trie.tables, ids, mask, jax.random.key(k)).leaves) for k in range(16)]
        first = trie.paths[np.concatenate(leaves, axis=1), 0].reshape(2, -1)  # [prompt, draws]
        n = first.shape[1]
        counts = (first[..., None] == codes).sum(axis=1)  # [prompt, codes]
        chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum(axis=1)
        assert np.all(chi2 < CHI2_DF3_P1E4), (temperature, chi2, counts / n, probs)
        np.testing.assert_allclose(counts / n, probs, rtol=0, atol=5 * np.sqrt(0.25 / n))


def test_sharded_over_eight_devices_draws_the_same_samples(setup):
    model, trie, _, ids, mask = setup
    single = _sampler(48, 1.0)(model, trie.tables, ids, mask, jax.random.key(0))
    mesh = make_mesh(MeshConfig(dp=2, fsdp=2, tp=2), jax.devices())
    placed = jax.device_put(model, param_shardings(model, mesh))
    sample = sharded_constrained_sample(mesh, model, num_samples=48, temperature=1.0)
    sharded = sample(placed, trie.tables, ids, mask, jax.random.key(0))
    assert len(sharded.leaves.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded.leaves), np.asarray(single.leaves))
    np.testing.assert_allclose(np.asarray(sharded.scores), np.asarray(single.scores), rtol=0, atol=1e-5)


def test_bad_temperature(setup):
    model, trie, _, ids, mask = setup
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        constrained_sample(model, trie.tables, ids, mask, jax.random.key(0), num_samples=2, temperature=0.0)
