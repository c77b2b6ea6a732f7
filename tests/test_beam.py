"""Constrained beam search against brute force: on a tiny random Qwen2 and a tiny catalog, beams >= catalog size
must return every catalog SID in the exhaustive ranking (full forward over prompt + SID + "\\n" + EOS), with the
same scores; fewer beams than SIDs, more beams than first-level codes, exact ties and an 8-device mesh too."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import tiny_qwen2

from sid.config import MeshConfig
from sid.eval.beam import beam_search, sharded_beam_search
from sid.eval.trie import build_trie
from sid.hlo import hlo_collectives, partitioned_hlo
from sid.models.qwen2 import Qwen2, pad_vocab
from sid.parallel.mesh import make_mesh
from sid.parallel.rules import param_shardings

VALID_VOCAB = 40  # ids 0..9 text, 10 "\n", 11 EOS, 12..39 SID tokens; rows 40..47 are vocab padding
NEWLINE, EOS = 10, 11
PROMPT_LEN = 12

_search = jax.jit(beam_search, static_argnames="num_beams")


@jax.jit
def _forward_logprobs(model, ids, positions, segment_ids):
    return jax.nn.log_softmax(model.logits(model(ids, positions, segment_ids)))


def _catalog(codebooks: tuple[int, ...], num_sids: int, *, seed: int):
    """Random distinct SIDs over the codebooks (two extra items share SIDs), SID tokens on shuffled vocab ids."""
    rng = np.random.default_rng(seed)
    levels = "abcd"[: len(codebooks)]
    names = [f"<{lv}_{c}>" for lv, size in zip(levels, codebooks, strict=True) for c in range(size)]
    token_ids = dict(zip(names, rng.permutation(np.arange(12, VALID_VOCAB))[: len(names)].tolist(), strict=False))
    combos = list(itertools.product(*[range(n) for n in codebooks]))
    chosen = [combos[i] for i in rng.choice(len(combos), num_sids, replace=False)]
    sids = ["".join(f"<{lv}_{c}>" for lv, c in zip(levels, combo, strict=True)) for combo in chosen]
    item_sids = {f"item{i}": sid for i, sid in enumerate(sids)}
    item_sids["dup0"], item_sids["dup1"] = sids[0], sids[1]
    return build_trie(item_sids, token_ids, end_ids=(NEWLINE, EOS))


def _model(seed: int = 0) -> Qwen2:
    # init_std: score gaps (>= 4e-3 here) far above f32 noise (~5e-6 at scores ~ -25)
    cfg = tiny_qwen2(vocab_size=VALID_VOCAB, init_std=0.2)
    return pad_vocab(Qwen2.init(cfg, key=jax.random.key(seed)), 16)


def _prompts(batch: int, *, seed: int) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
    """Random prompts of different lengths, left-padded with EOS (as upstream pads) to PROMPT_LEN."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 10, size=n).tolist() for n in rng.integers(2, PROMPT_LEN + 1, size=batch)]
    ids = np.full((batch, PROMPT_LEN), EOS, np.int32)
    mask = np.zeros((batch, PROMPT_LEN), bool)
    for row, p in enumerate(prompts):
        ids[row, PROMPT_LEN - len(p) :] = p
        mask[row, PROMPT_LEN - len(p) :] = True
    return prompts, ids, mask


def _exhaustive(model: Qwen2, prompts: list[list[int]], trie) -> np.ndarray:
    """Brute force [prompts, leaves]: one plain causal forward (no cache) over every prompt + SID + "\\n" + EOS,
    summing the log-probs of the completion tokens. Right-padded rows use segment 0 for the padding."""
    completions = [list(p) + [NEWLINE, EOS] for p in trie.paths.tolist()]
    rows = [(p, c) for p in prompts for c in completions]
    width = max(len(p) + len(c) for p, c in rows)
    ids = np.zeros((len(rows), width), np.int32)
    seg = np.zeros((len(rows), width), np.int32)
    for r, (p, c) in enumerate(rows):
        ids[r, : len(p) + len(c)] = p + c
        seg[r, : len(p) + len(c)] = 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), ids.shape)
    logp = np.asarray(_forward_logprobs(model, ids, positions, seg), np.float64)
    scores = np.zeros(len(rows))
    for r, (p, c) in enumerate(rows):
        scores[r] = sum(logp[r, len(p) - 1 + j, tok] for j, tok in enumerate(c))
    return scores.reshape(len(prompts), len(completions))


@pytest.fixture(scope="module")
def setup():
    model = _model()
    trie = _catalog((4, 3, 3), 22, seed=1)
    prompts, ids, mask = _prompts(8, seed=2)
    return model, trie, prompts, ids, mask, _exhaustive(model, prompts, trie)


def _check_against_oracle(out, trie, oracle, *, exhaustive: bool):
    tokens, scores, valid, leaves = (np.asarray(x) for x in out)
    k = scores.shape[1]
    for b in range(scores.shape[0]):
        n_valid = min(k, trie.num_leaves)
        assert valid[b].tolist() == [True] * n_valid + [False] * (k - n_valid)
        assert np.all(np.isneginf(scores[b, n_valid:])) and np.all(leaves[b, n_valid:] == -1)
        assert np.all(tokens[b, n_valid:] == -1)
        got = leaves[b, :n_valid]
        np.testing.assert_array_equal(tokens[b, :n_valid], trie.paths[got])  # tokens spell the leaf's SID
        np.testing.assert_allclose(scores[b, :n_valid], oracle[b, got], rtol=0, atol=1e-5)
        assert np.all(np.diff(scores[b, :n_valid]) <= 0)
        if exhaustive:
            np.testing.assert_array_equal(got, np.argsort(-oracle[b], kind="stable"))


def test_beams_cover_catalog_and_equal_exhaustive_ranking(setup):
    model, trie, _, ids, mask, oracle = setup
    out = _search(model, trie.tables, ids, mask, num_beams=trie.num_leaves + 4)
    _check_against_oracle(out, trie, oracle, exhaustive=True)
    preds = trie.predictions(np.asarray(out.leaves))
    assert all(sorted(p) == sorted(trie.sids) for p in preds)  # invalid beams never become predictions


def test_more_beams_than_first_level_codes_only_yields_catalog_sids(setup):
    model, trie, _, ids, mask, oracle = setup
    assert len(set(trie.paths[:, 0].tolist())) == 4
    out = _search(model, trie.tables, ids, mask, num_beams=6)  # 6 beams, 4 <a_*> codes: 2 impossible at step 0
    _check_against_oracle(out, trie, oracle, exhaustive=False)
    for row in trie.predictions(np.asarray(out.leaves)):
        assert len(row) == 6 and len(set(row)) == 6 and set(row) <= set(trie.sids)


def test_four_level_catalog_exhaustive():
    model = _model(seed=3)
    trie = _catalog((2, 2, 3, 2), 17, seed=4)
    prompts, ids, mask = _prompts(3, seed=5)
    out = _search(model, trie.tables, ids, mask, num_beams=trie.num_leaves)
    _check_against_oracle(out, trie, _exhaustive(model, prompts, trie), exhaustive=True)


def test_exact_ties_break_by_beam_then_token_id(setup):
    """A zero model gives every SID the same score; the order must be the trie's leaf order (token-id paths)."""
    model, trie, _, ids, mask, _ = setup
    flat = jax.tree.map(lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else x, model)
    for k in (6, trie.num_leaves + 4):
        out = _search(flat, trie.tables, ids, mask, num_beams=k)
        n = min(k, trie.num_leaves)
        expected = np.concatenate([np.arange(n), -np.ones(k - n, int)])
        np.testing.assert_array_equal(np.asarray(out.leaves), np.broadcast_to(expected, (ids.shape[0], k)))
        assert np.unique(np.asarray(out.scores)[:, :n]).size == 1


@pytest.mark.parametrize(
    "mesh_cfg",
    [MeshConfig(), MeshConfig(dp=2), MeshConfig(tp=2), MeshConfig(dp=2, fsdp=2, tp=2)],
    ids=["fsdp8", "dp2", "tp2", "dp2_fsdp2_tp2"],
)
def test_sharded_over_eight_devices_equals_single_device(setup, mesh_cfg, capfd):
    model, trie, _, ids, mask, oracle = setup
    assert jax.device_count() == 8
    outs = []
    for devices, cfg in ((jax.devices()[:1], MeshConfig()), (jax.devices(), mesh_cfg)):
        mesh = make_mesh(cfg, devices)
        placed = jax.device_put(model, param_shardings(model, mesh))
        outs.append(sharded_beam_search(mesh, model, num_beams=trie.num_leaves)(placed, trie.tables, ids, mask))
    single, sharded = outs
    assert len(sharded.scores.sharding.device_set) == 8
    for name in ("tokens", "valid", "leaves"):
        np.testing.assert_array_equal(np.asarray(getattr(sharded, name)), np.asarray(getattr(single, name)))
    np.testing.assert_allclose(np.asarray(sharded.scores), np.asarray(single.scores), rtol=0, atol=1e-5)
    _check_against_oracle(sharded, trie, oracle, exhaustive=True)
    # Activations stay split by batch (constrain_batch): with dp > 1 the partitioner used to shard some
    # of them by feature and fall back to replicating whole tensors where the two layouts met.
    assert "Involuntary full rematerialization" not in capfd.readouterr().err


@pytest.mark.parametrize("mesh_cfg", [MeshConfig(), MeshConfig(dp=2, fsdp=2, tp=2)], ids=["fsdp8", "dp2_fsdp2_tp2"])
def test_sharded_search_never_gathers_the_head(setup, mesh_cfg):
    # Each device scores its own rows of the vocab-split head (Qwen2.token_logprobs). Batch-split logits made the
    # partitioner gather the whole head onto every device at the prefill and at every decoding step.
    model, trie, _, ids, mask, _ = setup
    mesh = make_mesh(mesh_cfg)
    placed = jax.device_put(model, param_shardings(model, mesh))
    search = sharded_beam_search(mesh, model, num_beams=trie.num_leaves)
    _, hlo = partitioned_hlo(search.lower(placed, trie.tables, ids, mask))
    rows, dim = model.head_weight().shape
    gathers = [c for c in hlo_collectives(hlo) if c.kind == "all-gather"]
    assert [c for c in gathers if "dot_general" in c.op]  # the layers' fsdp weight gathers
    # (At this size the partitioner may gather the tied table for the input tokens' lookup, a `gather` op.)
    assert not [c for c in gathers if rows in c.shape and dim in c.shape and "dot_general" in c.op]
