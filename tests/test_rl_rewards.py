"""Rewards and group advantages against hand-computed values (upstream's normalisation and sample std included)."""

import numpy as np
import pytest

from sid.rl.advantages import group_advantages, zero_advantage_fraction
from sid.rl.rewards import REWARDS, get_reward, ranking, ranking_only, register_reward, rule

T, X, Y, Z = "<a_1><b_2><c_3>", "<a_1><b_2><c_4>", "<a_5><b_2><c_3>", "<a_0><b_0><c_0>"
# Group of 4: 1/log2(i+2) = 1, 0.6309298, 0.5, 0.4306766; sum 2.5616063; penalty_i = -(1/log2(i+2)) / sum.
P0, P1, P2, P3 = -0.3903800500, -0.2463023887, -0.1951900250, -0.1681275363

COMPLETIONS = np.array(
    [
        [T, X, Y, Z],  # hit at rank 0
        [X, Y, Z, T],  # hit at the last rank
        [X, Y, Z, X],  # no hit (a sampled group may repeat a SID)
        [Y, T, X, T],  # the target drawn twice (sampling)
    ]
)
TARGETS = np.array([T, T, T, T])
RANKS = np.broadcast_to(np.arange(4), (4, 4))


def test_rule():
    expected = [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 1]]
    np.testing.assert_array_equal(rule(COMPLETIONS, RANKS, TARGETS), expected)


def test_ranking_only_hand_computed():
    expected = [[0, P1, P2, P3], [P0, P1, P2, 0], [0, 0, 0, 0], [P0, 0, P2, 0]]
    np.testing.assert_allclose(ranking_only(COMPLETIONS, RANKS, TARGETS), expected, rtol=0, atol=1e-9)
    # Upstream normalises over all G ranks, not over the wrong ones: a full group of misses would sum to -1.
    assert sum([P0, P1, P2, P3]) == pytest.approx(-1.0, abs=1e-9)


def test_ranking_is_rule_plus_penalty():
    expected = [[1, P1, P2, P3], [P0, P1, P2, 1], [0, 0, 0, 0], [P0, 1, P2, 1]]
    np.testing.assert_allclose(ranking(COMPLETIONS, RANKS, TARGETS), expected, rtol=0, atol=1e-9)


def test_ranks_drive_the_penalty_not_the_column():
    """A group given out of order gets each completion's penalty by its rank."""
    ranks = np.array([[3, 2, 1, 0]])
    got = ranking_only(COMPLETIONS[1:2], ranks, TARGETS[:1])
    np.testing.assert_allclose(got, [[P3, P2, P1, 0]], rtol=0, atol=1e-9)


def test_registry_and_bad_input():
    assert {"rule", "ranking", "ranking_only"} <= set(REWARDS)
    assert get_reward("ranking") is ranking
    with pytest.raises(ValueError, match="unknown reward 'ndcg'.*ranking_only"):
        get_reward("ndcg")
    with pytest.raises(ValueError, match="already registered"):
        register_reward("rule")(rule)

    @register_reward("test_length")
    def length(completions, ranks, targets):
        return np.char.str_len(np.asarray(completions)).astype(np.float64)

    try:
        assert get_reward("test_length")(COMPLETIONS, RANKS, TARGETS).shape == (4, 4)
    finally:
        del REWARDS["test_length"]
    with pytest.raises(ValueError, match="ranks must be integers in \\[0, 4\\)"):
        rule(COMPLETIONS, RANKS + 1, TARGETS)
    with pytest.raises(ValueError, match="targets shape"):
        rule(COMPLETIONS, RANKS, TARGETS[:2])
    with pytest.raises(ValueError, match="completions must be \\[prompts, group\\]"):
        rule(COMPLETIONS[0], RANKS[0], TARGETS)


def test_group_advantages_use_the_sample_std():
    rewards = np.array([[1.0, 0, 0, 0], [2.0, 2, 2, 2], [1.0, P1, P2, P3]])
    adv = group_advantages(rewards)
    # Row 0: mean 0.25, sample std sqrt((0.75^2 + 3 * 0.25^2) / 3) = 0.5 (the population std would be 0.433).
    np.testing.assert_allclose(adv[0], [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001], atol=1e-12)
    np.testing.assert_array_equal(adv[1], 0.0)  # equal rewards: advantage 0, not 0/0
    row = rewards[2]
    mean, std = row.sum() / 4, np.sqrt(((row - row.sum() / 4) ** 2).sum() / 3)
    np.testing.assert_allclose(adv[2], (row - mean) / (std + 1e-4), rtol=1e-12)
    np.testing.assert_allclose(adv.sum(axis=1), 0.0, atol=1e-12)


def test_zero_advantage_fraction_and_bad_input():
    rewards = ranking(COMPLETIONS, RANKS, TARGETS)
    assert zero_advantage_fraction(rewards) == 0.25  # the group without a hit
    assert zero_advantage_fraction(np.zeros((3, 4))) == 1.0
    with pytest.raises(ValueError, match="group >= 2"):
        group_advantages(np.ones((3, 1)))
    with pytest.raises(ValueError, match="finite"):
        group_advantages(np.array([[0.0, np.nan]]))
    with pytest.raises(ValueError, match="prompts >= 1"):
        zero_advantage_fraction(np.zeros((0, 4)))
