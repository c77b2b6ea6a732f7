"""Rollout -> GRPO batch: the rows' layout, group rewards/advantages/metrics by hand, bad input, and one GRPO step
through `sid.step`'s jitted train step on a 2-device mesh."""

from types import SimpleNamespace

import equinox as eqx
import jax
import numpy as np
import optax
import pytest
from test_beam import EOS, NEWLINE, _catalog, _model, _prompts
from test_rl_rewards import P0, P2

from sid.config import MeshConfig
from sid.models.qwen2 import prefix_segments
from sid.parallel.host import to_global
from sid.parallel.mesh import batch_sharding, make_mesh
from sid.rl.advantages import group_advantages
from sid.rl.config import RLConfig
from sid.rl.loss import completion_logprobs, make_loss_fn, rl_step_stats
from sid.rl.rewards import get_reward
from sid.rl.rollout import dynamic_selection, group_rows, plan_rows, score_groups, target_leaves, with_target_last
from sid.rl.source import RolloutSource, left_pad, rollout_columns
from sid.step import init_state, make_train_step


@pytest.fixture(scope="module")
def trie():
    return _catalog((4, 3, 3), 22, seed=1)


def test_plan_rows_by_hand():
    lengths = np.array([5, 3, 4, 2, 6])
    # Two cells of 3 group slots. Dealt longest first to the cell with the fewest tokens (a tie to the first):
    # 6 -> cell 0, 5 -> 1, 4 -> 1 (5 < 6), 3 -> 0 (6 < 9), 2 -> 0 (a tie at 9). First fit in rows of 8: cell 0
    # [6, 2], [3]; cell 1 [5], [4].
    plan = plan_rows(lengths, 8, pack=True, cells=2)
    np.testing.assert_array_equal(plan.cell, [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(plan.slot, [0, 1, 1, 2, 0])
    np.testing.assert_array_equal(plan.row, [0, 1, 1, 0, 0])
    np.testing.assert_array_equal(plan.start, [0, 0, 0, 6, 0])
    assert (plan.cells, plan.groups, plan.rows) == (2, 3, 2)
    np.testing.assert_array_equal(plan.place(np.arange(1, 6)), [[5, 2, 4], [1, 3, 0]])  # cell 1's last slot empty
    # One cell: first-fit-decreasing, 6 | 5 | 4, then 3 beside 5 and 2 beside 6.
    plan = plan_rows(lengths, 8, pack=True, cells=1)
    assert plan.row.tolist() == [1, 1, 2, 0, 0] and plan.start.tolist() == [0, 5, 0, 6, 0] and plan.rows == 3
    assert plan.slot.tolist() == [1, 3, 2, 4, 0] and plan.groups == 5
    alone = plan_rows(lengths, 8, pack=False, cells=2)
    np.testing.assert_array_equal(alone.row, alone.slot)
    assert (alone.cells, alone.groups, alone.rows) == (2, 3, 3) and not alone.start.any()
    for bad in ([3, 9], [0, 3]):
        with pytest.raises(ValueError, match=f"groups of {min(bad)} to {max(bad)} tokens: each must fill 1 to 8"):
            plan_rows(np.array(bad), 8, pack=True, cells=1)
    with pytest.raises(ValueError, match="cells must be >= 1, got 0"):
        plan_rows(lengths, 8, pack=True, cells=0)


@pytest.mark.parametrize("pack", [True, False])
def test_group_rows_layout(trie, pack):
    """Each prompt's tokens in a shared prefix of its row (the k-th group of the row in prefix k), positions from 0;
    each completion's fed tokens in a member segment, positions after the prompt's; token_index at the columns of
    the cell's flattened rows that predict each completion token."""
    prompts, _, _ = _prompts(5, seed=2)
    ids, mask = left_pad(prompts, 40, EOS)
    leaves = np.array([[0, 5, 21, 5], [7, 3, 2, 1], [4, 4, 9, 0], [1, 2, 3, 4], [8, 8, 8, 8]])
    rows, plan = group_rows(trie, ids, mask, leaves, pack=pack, cells=2)
    width = 40 + 4 * 4  # the longest prompt, then each completion's first T - 1 = 4 tokens
    shape = (2, plan.rows, width)
    assert rows["input_ids"].shape == rows["segment_ids"].shape == rows["positions"].shape == shape
    assert rows["completions"].shape == rows["token_index"].shape == (2, 3, 4, 5)
    assert (plan.rows < 3) == pack
    np.testing.assert_array_equal(rows["completion_mask"].all(axis=(2, 3)), plan.place(np.ones(5, bool)))
    for p, prompt in enumerate(prompts):
        c, r, j = plan.cell[p], plan.row[p], plan.slot[p]
        earlier = sum(plan.cell[q] == c and plan.row[q] == r for q in range(p))
        prefix, members = prefix_segments(earlier, 4)
        ids_r, seg_r, pos_r = (rows[k][c, r] for k in ("input_ids", "segment_ids", "positions"))
        np.testing.assert_array_equal(ids_r[seg_r == prefix], prompt)
        np.testing.assert_array_equal(pos_r[seg_r == prefix], np.arange(len(prompt)))
        for g in range(4):
            completion = np.concatenate([trie.paths[leaves[p, g]], [NEWLINE, EOS]])
            np.testing.assert_array_equal(rows["completions"][c, j, g], completion)
            fed = np.flatnonzero(seg_r == members[g])
            np.testing.assert_array_equal(ids_r[fed], completion[:-1])
            np.testing.assert_array_equal(pos_r[fed], len(prompt) + np.arange(4))
            columns = np.concatenate([[np.flatnonzero(seg_r == prefix)[-1]], fed])  # the prompt's last, then fed
            np.testing.assert_array_equal(rows["token_index"][c, j, g], r * width + columns)
    assert (rows["segment_ids"] != 0).sum() == mask.sum() + 5 * 4 * 4  # every token once, nothing else
    assert rows["input_ids"].dtype == rows["segment_ids"].dtype == rows["completions"].dtype == np.int32


def test_score_groups_by_hand(trie):
    leaves = np.array([[0, 5, 21, 5], [7, 3, 2, 1]])
    targets = [trie.sids[5], trie.sids[9]]  # prompt 0 holds its target twice (a sampled group); prompt 1 misses
    rewards, adv, metrics = score_groups(trie, leaves, targets, get_reward("ranking"))
    np.testing.assert_allclose(rewards, [[P0, 1.0, P2, 1.0], [0, 0, 0, 0]], rtol=0, atol=1e-9)
    assert adv.dtype == np.float32
    np.testing.assert_allclose(adv, group_advantages(rewards), rtol=1e-6)
    assert metrics["reward_mean"] == pytest.approx((P0 + P2 + 2) / 8)
    assert metrics["reward_std"] == pytest.approx(np.std([P0, 1, P2, 1], ddof=1) / 2)
    assert metrics["zero_advantage_fraction"] == 0.5 and metrics["group_hit_rate"] == 0.5


def test_bad_input(trie):
    _, ids, mask = _prompts(2, seed=2)
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        group_rows(trie, ids, mask * np.array([[True], [False]]), np.zeros((2, 2), int))
    with pytest.raises(ValueError, match="-1 marks beams the catalog could not fill"):
        group_rows(trie, ids, mask, np.array([[0, 1, -1], [0, 1, 2]]))
    with pytest.raises(ValueError, match="leaves must be \\[prompts, group\\]"):
        score_groups(trie, np.array([0, 1]), [trie.sids[0]], get_reward("rule"))
    with pytest.raises(ValueError, match="share the number of prompts"):
        group_rows(trie, ids, mask, np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="reward returned shape \\(2,\\)"):
        score_groups(trie, np.zeros((2, 2), int), ["a", "b"], lambda c, r, t: np.zeros(2))


def test_one_grpo_step_through_the_train_step(trie):
    """ref == policy, so the step's loss is -mean(A) and KL 0; after one SGD step the policy's log-probs move
    towards the positive advantages (first order: sum_i A_i d(mean_t logp_i) > 0)."""
    model = _model(seed=2)
    _, ids, mask = _prompts(4, seed=6)
    leaves = np.random.default_rng(7).integers(0, trie.num_leaves, size=(4, 4))
    targets = [trie.sids[leaves[0, 0]], trie.sids[leaves[1, 3]], trie.sids[(leaves[2, 0] + 1) % 22], trie.sids[0]]
    _, adv, _ = score_groups(trie, leaves, targets, get_reward("ranking"))
    rows, plan = group_rows(trie, ids, mask, leaves, cells=4)  # 2 data shards x 2 micro-batches
    num_tokens = rows["completions"].shape[3]
    logprobs = eqx.filter_jit(completion_logprobs)
    ref = np.asarray(logprobs(model, rows))
    batch = {**rows, "advantages": plan.place(adv), "ref_logp": ref}

    mesh = make_mesh(MeshConfig(dp=2), jax.devices()[:2])
    opt = optax.sgd(1e-2)
    state, static, sharding = init_state(model, opt, seed=0, mesh=mesh)
    step = make_train_step(
        static, make_loss_fn(beta=1e-3), opt, accum=2, mesh=mesh, state_sharding=sharding, lr_schedule=lambda s: 1e-2
    )
    state, metrics = step(state, to_global(batch, mesh))
    assert int(metrics["completions"]) == 16 and int(metrics["completion_tokens"]) == 16 * num_tokens
    assert int(metrics["tokens"]) == mask.sum() + 16 * (num_tokens - 1)  # what the forward ran: prompts once
    assert int(metrics["row_tokens"]) == rows["input_ids"].size  # the real tokens and the padding
    assert float(metrics["loss"]) == pytest.approx(-adv.mean(), abs=1e-6)
    assert float(metrics["kl_sum"]) == pytest.approx(0.0, abs=1e-6)
    assert float(metrics["ratio_sum"]) == pytest.approx(float(metrics["ratio_units"]), rel=1e-6)
    after = np.asarray(logprobs(eqx.combine(state.params, static), rows))
    gain = plan.place(adv) * (after - ref).mean(axis=-1)
    assert np.abs(after - ref).max() > 1e-4 and gain.sum() > 0


def test_rollout_columns_give_score_groups_metrics_and_step_stats_divide_them(trie):
    """The per-row columns the loss sums, divided by the completions as `rl_step_stats` does, are `score_groups`'
    metrics; the KL, length, ratio and clip figures are the loss stats' ratios."""
    leaves = np.array([[0, 5, 21, 5], [7, 3, 2, 1], [4, 4, 4, 4]])
    targets = np.array([trie.sids[5], trie.sids[9], trie.sids[4]])
    rewards, _, metrics = score_groups(trie, leaves, targets, get_reward("ranking"))
    columns = rollout_columns(trie, leaves, targets, rewards)
    assert all(c.shape == (3, 4) and c.dtype == np.float32 for c in columns.values())
    stats = {f"{k}_sum": c.sum(dtype=np.float64) for k, c in columns.items()}
    stats.update(completions=12, completion_tokens=60, kl_sum=1.2, ratio_sum=60.0, ratio_units=60, clipped=6)
    stats.update(tokens=300, row_tokens=400)
    out = rl_step_stats(stats)
    assert out["row_fill"] == 0.75
    for name, value in metrics.items():
        assert out[f"rollout/{name}"] == pytest.approx(value, rel=1e-6), name
    assert (out["kl"], out["completion_length"], out["ratio"], out["clip_fraction"]) == pytest.approx((0.1, 5, 1, 0.1))


def test_prompt_order_is_a_seeded_permutation_per_epoch():
    source = RolloutSource.__new__(RolloutSource)  # only the order bookkeeping: no model, no mesh
    source.targets, source.seed, source.consumed = np.arange(10), 3, 0
    source.cfg, source.reference = RLConfig(prompts_per_step=4), SimpleNamespace(resumed=lambda: None)
    drawn = np.concatenate([source._next_prompts() for _ in range(5)])  # 20 prompts: two epochs exactly
    assert sorted(drawn[:10]) == sorted(drawn[10:]) == list(range(10)) and list(drawn[:10]) != list(drawn[10:])
    assert source.get_state() == {"consumed": 20} and source.step == 5
    source.set_state({"consumed": 8})
    again = np.concatenate([source._next_prompts() for _ in range(3)])
    np.testing.assert_array_equal(again, drawn[8:20])


def test_dynamic_selection_by_hand():
    """Upstream's selection: the target's copies first, then the other draws by count (ties by first draw), one
    copy of each per round."""
    draws = np.array([[5, 3, 5, 7, 3, 5], [1, 2, 2, 4, 4, 4], [3, 3, 3, 3, 3, 1], [6, 6, 6, 6, 6, 6]])
    got = dynamic_selection(draws, np.array([3, 9, 3, 2]), 4)
    np.testing.assert_array_equal(got, [[3, 3, 5, 7], [4, 2, 1, 4], [3, 3, 3, 3], [6, 6, 6, 6]])
    ties = dynamic_selection(np.array([[8, 2, 2, 8, 5, 5]]), np.array([0]), 4)  # equal counts keep draw order
    np.testing.assert_array_equal(ties, [[8, 2, 5, 8]])
    with pytest.raises(ValueError, match="keeps 4 of each prompt's draws, but got 3"):
        dynamic_selection(draws[:, :3], np.array([3, 9, 3, 2]), 4)


def test_add_gt_puts_the_target_last_and_target_leaves_name_a_missing_sid(trie):
    targets = target_leaves(trie, [trie.sids[5], trie.sids[0]])
    np.testing.assert_array_equal(targets, [5, 0])
    leaves = np.array([[1, 2, 3], [0, 4, 6]])
    np.testing.assert_array_equal(with_target_last(leaves, targets), [[1, 2, 5], [0, 4, 0]])
    assert leaves[0, 2] == 3  # the rollout's own leaves are left as they were
    with pytest.raises(ValueError, match="target SID <a_99><b_0><c_0> is not in the catalog's trie"):
        target_leaves(trie, [trie.sids[1], "<a_99><b_0><c_0>"])


def test_reference_logprobs_run_in_the_updates_micro_batches(trie):
    """The reference pass over 4 cells (2 data shards x 2 micro-batches), a micro-batch's 2 cells at a time on a
    2-device mesh, gives the whole batch's log-probs, each group's in its own place."""
    model = _model(seed=2)
    _, ids, mask = _prompts(4, seed=6)
    leaves = np.random.default_rng(7).integers(0, trie.num_leaves, size=(4, 3))
    rows, _ = group_rows(trie, ids, mask, leaves, pack=False, cells=4)
    whole = eqx.filter_jit(completion_logprobs)(model, rows)
    source = RolloutSource.__new__(RolloutSource)  # only the reference pass: no trie, prompts or policy
    seen = []

    def ref_logprobs(reference, part):
        seen.append(part["input_ids"].shape[0])
        return eqx.filter_jit(completion_logprobs)(reference, part)

    source.micro_batches, source.ref_logprobs = 2, ref_logprobs
    source.sharding = batch_sharding(make_mesh(MeshConfig(dp=2), jax.devices()[:2]))
    out = source._reference_logprobs(model, rows)
    assert seen == [2, 2] and out.shape == rows["completions"].shape == (4, 1, 3, 5)
    np.testing.assert_allclose(out, np.asarray(whole), rtol=1e-5, atol=1e-6)


def test_rollout_chunks_run_length_sorted_prompts_in_their_own_buckets(trie, tmp_path):
    """Two chunks of two prompts on a 2-device mesh: the two shortest prompts padded to 4 tokens, the two longest to
    16, and the same beams, each prompt's in its place, as all four at once padded to 16."""
    model = _model(seed=2)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 10, size=n).tolist() for n in (3, 11, 2, 9)]
    targets = [trie.sids[i] for i in (0, 5, 9, 13)]
    mesh = make_mesh(MeshConfig(dp=2), jax.devices()[:2])

    def source(chunks: int) -> RolloutSource:
        cfg = RLConfig(group_size=3, prompts_per_step=4, rollout_chunks=chunks)
        return RolloutSource(trie, prompts, targets, model, cfg, mesh, prompt_length=16, pad_id=EOS, seed=0,
                             run_dir=tmp_path / str(chunks), buckets=(4, 16))  # fmt: skip

    chunked, whole = source(2), source(1)
    widths = []
    beams = chunked.rollout
    chunked.rollout = lambda m, t, ids, mask: (widths.append(ids.shape), beams(m, t, ids, mask))[1]
    idx = np.arange(4)
    got = chunked._rollout(model, idx, 0)
    assert widths == [(2, 4), (2, 16)]  # prompts 2 and 0 (2 and 3 tokens), then 3 and 1 (9 and 11)
    np.testing.assert_array_equal(got, whole._rollout(model, idx, 0))
    assert got.shape == (4, 3) and len(np.unique(got[0])) == 3
