"""sid.index: k-means against a NumPy reference and scikit-learn, balanced capacities, RQ-VAE training, the collision
fix (hand-made cases), collaborative embeddings on a hand-made interaction set, text embeddings against transformers,
bad input, and SIDs built end to end that `sid.train` then trains on."""

import argparse
import csv
import importlib
import importlib.util
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sid.data.config import DataConfig
from sid.data.dataset import load_split
from sid.data.minionerec import Interaction, read_index
from sid.data.synthetic import write_synthetic
from sid.index.__main__ import main as index_main
from sid.index.build import relative_error
from sid.index.collisions import CollisionError, codebook_use, collision_stats, extra_level, make_unique, reassign
from sid.index.config import EmbedConfig, QuantizerConfig
from sid.index.embed import EmbeddingError, collaborative, cooccurrence, load_npy, ppmi, truncated_svd
from sid.index.kmeans import balanced_assign, greedy_candidates, kmeans, kmeans_pp, objective
from sid.index.residual import rq_kmeans
from sid.index.rqvae import rq_vae, train_rqvae
from sid.index.text import item_texts, text_embeddings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench():
    """bench/index_speed.py as a module (its NumPy Lloyd is the reference here)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        yield importlib.import_module("index_speed")
    finally:
        sys.path.remove(str(ROOT / "bench"))


def blobs(n: int, dim: int, centers: int, seed: int, spread: float = 0.2) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = 2.0 * rng.standard_normal((centers, dim))
    return (means[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, dim))).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# k-means


def potential(x: np.ndarray, centroids) -> float:
    """The k-means++ potential: each point's squared distance to its nearest centroid, summed (float64)."""
    x64, c = x.astype(np.float64), np.asarray(centroids, np.float64)
    return float(((x64[:, None, :] - c[None]) ** 2).sum(-1).min(1).sum())


def test_kmeans_objective_within_one_percent_of_numpy_lloyd(bench):
    """The bench's NumPy reference is plain k-means++ then Lloyd, so sid runs the same recipe (candidates=1): the
    comparison checks sid's Lloyd and plain seeding, not the gain of greedy seeding (the scikit-learn test does)."""
    x = blobs(800, 8, 20, seed=0, spread=0.5)
    ours = min(float(objective(x, *kmeans(x, 20, jax.random.key(s), iters=30, candidates=1))) for s in range(3))
    x64 = x.astype(np.float64)
    ref = []
    for s in range(3):
        c, codes = bench.numpy_kmeans(x64, 20, 30, np.random.default_rng(s))
        ref.append(((x64 - c[codes]) ** 2).sum())
    assert ours <= 1.01 * min(ref), (ours, min(ref))


def test_kmeans_objective_matches_sklearn_from_the_same_centers():
    """From the same k-means++ centers and as many Lloyd steps (2: still moving; 30: converged), sid reaches
    scikit-learn's objective: within 1% is the issue's bar; they agree to float rounding, so 1e-4 is asserted.
    scikit-learn draws its own seeding from NumPy's generator, not JAX's, so the centers are handed over."""
    KMeans = pytest.importorskip("sklearn.cluster").KMeans
    x = blobs(800, 8, 20, seed=0, spread=0.5)
    x64 = x.astype(np.float64)
    for s, iters in itertools.product(range(3), (2, 30)):
        ours = float(objective(x, *kmeans(x, 20, jax.random.key(s), iters=iters)))
        init = np.asarray(kmeans_pp(x, 20, jax.random.key(s)))
        km = KMeans(n_clusters=20, init=init, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd").fit(x)
        ref = ((x64 - km.cluster_centers_[km.labels_]) ** 2).sum()
        assert abs(ours - ref) <= 1e-4 * ref, (s, iters, ours, ref)


@pytest.mark.parametrize("data_seed", [0, 1, 2])
def test_kmeans_objective_within_one_percent_of_sklearn_each_from_its_own_seeding(data_seed):
    """The issue's bar: sid's default k-means (greedy k-means++, 30 Lloyd steps) within 1% of scikit-learn's
    KMeans with its own (greedy) k-means++ seeding, best of 3 seeds each. 20 codes for 20 blobs: plain k-means++
    often leaves two codes in one blob, and with candidates=1 sid misses this bar on all three data sets (3.7%,
    10.6% and 6.9% above scikit-learn when measured; greedy: 15%, 8% and 10% below)."""
    KMeans = pytest.importorskip("sklearn.cluster").KMeans
    x = blobs(800, 8, 20, seed=data_seed, spread=0.5)
    x64 = x.astype(np.float64)
    ours = min(float(objective(x, *kmeans(x, 20, jax.random.key(s), iters=30))) for s in range(3))
    ref = []
    for s in range(3):
        km = KMeans(n_clusters=20, init="k-means++", n_init=1, max_iter=30, tol=0.0, algorithm="lloyd", random_state=s)
        km.fit(x)
        ref.append(((x64 - km.cluster_centers_[km.labels_]) ** 2).sum())
    assert ours <= 1.01 * min(ref), (ours, min(ref))


def test_greedy_seeding_lowers_the_potential():
    """Over 10 seeds, greedy k-means++ (the default: 2 + floor(ln 20) = 4 candidates per pick) leaves a lower mean
    potential than plain k-means++ (candidates=1): 0.71 of it when measured. The bar is 0.9, which a "greedy"
    seeding that keeps a random or the first candidate (plain k-means++ under other draws) does not reach."""
    x = blobs(800, 8, 20, seed=0, spread=0.5)
    assert greedy_candidates(20) == 4 and greedy_candidates(256) == 7 and greedy_candidates(2) == 2
    greedy = np.mean([potential(x, kmeans_pp(x, 20, jax.random.key(s))) for s in range(10)])
    plain = np.mean([potential(x, kmeans_pp(x, 20, jax.random.key(s), candidates=1)) for s in range(10)])
    assert greedy <= 0.9 * plain, (greedy, plain)


def test_seeding_is_deterministic_per_seed():
    x = blobs(300, 4, 6, seed=1)
    for candidates in (None, 1, 5):
        first = np.asarray(kmeans_pp(x, 8, jax.random.key(3), candidates))
        np.testing.assert_array_equal(first, np.asarray(kmeans_pp(x, 8, jax.random.key(3), candidates)))
        assert not np.array_equal(first, np.asarray(kmeans_pp(x, 8, jax.random.key(4), candidates)))
        # every centroid is one of the points, and no point is picked twice (300 distinct points)
        rows = [np.flatnonzero((x == c).all(1)) for c in first]
        assert all(len(r) == 1 for r in rows) and len({int(r[0]) for r in rows}) == 8
    with pytest.raises(ValueError, match="at least 1 candidate"):
        kmeans_pp(x, 8, jax.random.key(3), 0)


def test_plain_seeding_draws_what_sid_drew_before_greedy():
    """candidates=1 (`quantizer.seeding_candidates: 1`) rebuilds the SIDs of before greedy seeding became the
    default: these rows are what the plain k-means++ of commit a96757e picked (under JAX 0.10.2's threefry)."""
    x = blobs(200, 4, 6, seed=1)
    before = {
        0: [191, 179, 49, 10, 45, 50, 176, 197, 75, 30, 77, 41],
        7: [99, 151, 28, 9, 116, 17, 180, 199, 150, 42, 148, 57],
    }
    for s, rows in before.items():
        np.testing.assert_array_equal(np.asarray(kmeans_pp(x, 12, jax.random.key(s), candidates=1)), x[rows])
        assert not np.array_equal(np.asarray(kmeans_pp(x, 12, jax.random.key(s))), x[rows])


def test_quantizer_config_passes_seeding_candidates():
    x = blobs(300, 4, 6, seed=1)
    assert QuantizerConfig().candidates is None and QuantizerConfig(seeding_candidates=1).candidates == 1
    plain = QuantizerConfig(levels=2, codebook_size=8, kmeans_iters=5, seeding_candidates=1).build()(x)
    same = rq_kmeans(x, 2, 8, iters=5, balanced=False, seed=0, candidates=1)
    greedy = QuantizerConfig(levels=2, codebook_size=8, kmeans_iters=5).build()(x)
    np.testing.assert_array_equal(plain.codes, same.codes)
    assert not np.array_equal(plain.codes, greedy.codes)  # so the two checks tell them apart
    np.testing.assert_array_equal(greedy.codes, rq_kmeans(x, 2, 8, iters=5, balanced=False, seed=0).codes)
    with pytest.raises(ValueError, match="seeding_candidates"):
        QuantizerConfig(seeding_candidates=-1)


def test_kmeans_is_deterministic_and_assigns_nearest():
    x = blobs(300, 4, 6, seed=1)
    c1, a1 = kmeans(x, 6, jax.random.key(7), iters=10)
    c2, a2 = kmeans(x, 6, jax.random.key(7), iters=10)
    np.testing.assert_array_equal(np.asarray(c1), np.asarray(c2))
    d = ((x[:, None, :] - np.asarray(c1)[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(a1), d.argmin(1))
    np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))


def test_balanced_assignment_respects_capacity():
    rng = np.random.default_rng(0)
    dist = rng.random((103, 10)).astype(np.float32)
    dist[:, 3] -= 1.0  # every point prefers code 3
    codes = np.asarray(balanced_assign(dist, 11))
    assert codes.min() >= 0 and np.bincount(codes, minlength=10).max() <= 11
    # the points code 3 keeps are its 11 closest
    np.testing.assert_array_equal(np.sort(np.flatnonzero(codes == 3)), np.sort(np.argsort(dist[:, 3])[:11]))
    # with room for everyone it is the nearest-code assignment
    np.testing.assert_array_equal(np.asarray(balanced_assign(dist, 103)), dist.argmin(1))
    with pytest.raises(ValueError, match="do not fit"):
        balanced_assign(dist, 10)


def test_balanced_kmeans_spreads_a_lopsided_set():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.standard_normal((270, 2)) * 0.1, rng.standard_normal((30, 2)) + 5.0]).astype(np.float32)
    _, plain = kmeans(x, 10, jax.random.key(0), iters=10)
    _, even = kmeans(x, 10, jax.random.key(0), iters=10, capacity=30)
    assert np.bincount(np.asarray(even), minlength=10).max() <= 30
    assert np.bincount(np.asarray(plain), minlength=10).max() > 30


def test_rq_kmeans_levels_reduce_the_residual():
    x = blobs(400, 6, 30, seed=3)
    errors = []
    for levels in (1, 2, 3):
        q = rq_kmeans(x, levels, 8, iters=10, balanced=False, seed=0)
        assert q.codes.shape == (400, levels) and q.codes.min() >= 0 and q.codes.max() < 8
        assert q.last_distances.shape == (400, 8)
        errors.append(relative_error(x, q.reconstruct(q.codes)))
    assert errors[0] > errors[1] > errors[2]


def test_rqvae_loss_falls_and_reconstructs_a_mixture():
    x = blobs(512, 16, 8, seed=4, spread=0.05)
    x = x / np.sqrt((x**2).sum(1).mean())
    cfg = QuantizerConfig(
        kind="rq_vae", levels=2, codebook_size=8, latent_dim=8, hidden_dim=32, steps=200, batch_size=128,
        learning_rate=3e-3, kmeans_iters=10,
    )  # fmt: skip
    _, losses = train_rqvae(x, cfg)
    assert np.mean(losses[-20:]) < 0.3 * losses[0], (losses[0], losses[-20:])
    q = rq_vae(10.0 * x, cfg)  # a larger scale: rq_vae normalizes its input and scales the reconstruction back
    assert relative_error(10.0 * x, q.reconstruct(q.codes)) < 0.15
    assert q.codes.shape == (512, 2)


# ----------------------------------------------------------------------------------------------------------------
# collisions

CODES = np.array([[0, 0], [0, 0], [0, 1], [1, 0], [0, 0]])
DISTANCES = np.array([[0.5, 0.1, 0.2, 0.7], [0.2, 0.3, 0.9, 0.9], [9, 0, 9, 9], [0, 9, 9, 9], [0.2, 0.05, 0.1, 0.9]])


def test_collision_stats_and_codebook_use_by_hand():
    assert collision_stats(CODES) == {"items": 5, "distinct_sids": 3, "items_sharing_a_sid": 3, "rate": 1 - 3 / 5}
    level0 = codebook_use(CODES, 4)[0]
    assert level0["used"] == 2 and level0["fraction"] == 0.5 and level0["largest"] == 4
    assert level0["perplexity"] == pytest.approx(math.exp(-(0.8 * math.log(0.8) + 0.2 * math.log(0.2))))


def test_reassign_by_hand():
    # Group (0,0) = items 0, 1, 4; item 1 and 4 tie on their own distance (0.2): item 1 keeps the SID by order.
    # Item 4's nearest is code 1, taken by item 2, so code 2; item 0 then finds 1 and 2 taken, 0 taken: code 3.
    expected = np.array([[0, 3], [0, 0], [0, 1], [1, 0], [0, 2]])
    np.testing.assert_array_equal(reassign(CODES, DISTANCES), expected)
    np.testing.assert_array_equal(make_unique(CODES, DISTANCES, "reassign"), expected)
    with pytest.raises(CollisionError, match=r"prefix \(0,\) has more than 3 items"):
        reassign(CODES, DISTANCES[:, :3])


def test_extra_level_by_hand():
    expected = np.array([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 0, 2]])
    np.testing.assert_array_equal(extra_level(CODES), expected)
    np.testing.assert_array_equal(make_unique(CODES, DISTANCES, "extra_level"), expected)


def test_fix_is_unique_and_deterministic_at_scale():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, (500, 3))  # 64 SIDs for 500 items: heavy collisions
    dist = rng.random((500, 64))  # 16 prefixes of about 31 items: room for all of them among 64 codes
    codes[:, -1] = dist[:, :4].argmin(1)
    once = reassign(codes, dist)
    assert collision_stats(once)["distinct_sids"] == 500
    np.testing.assert_array_equal(once, reassign(codes, dist))
    np.testing.assert_array_equal(once[:, :-1], codes[:, :-1])  # only the last level moves


# ----------------------------------------------------------------------------------------------------------------
# embeddings


def _interaction(history: tuple[int, ...], target: int) -> Interaction:
    return Interaction("u", history, ("",) * len(history), None, target, "", None)


# Items 0-2 are bought together, so are 3-5; item 6 only ever with 0 once.
HAND = [_interaction((0, 1), 2), _interaction((1,), 0), _interaction((2,), 1), _interaction((3, 4), 5)]
HAND += [_interaction((4,), 3), _interaction((5,), 4), _interaction((3,), 5), _interaction((6,), 0)]


def test_cooccurrence_and_ppmi_by_hand():
    counts = cooccurrence(HAND, list(range(7)), window=5, path="hand").toarray()
    assert counts[0, 2] == counts[2, 0] == 1 and counts[1, 2] == 2 and counts[0, 1] == 1 and counts[3, 5] == 2
    assert counts[0, 6] == 1 and counts[0, 3] == 0 and np.all(np.diag(counts) == 0)
    assert cooccurrence(HAND, list(range(7)), window=1, path="hand").toarray()[0, 2] == 0  # item 0 is 2 back
    c = counts.astype(np.float64)
    with np.errstate(divide="ignore"):
        expected = np.maximum(np.log(c * c.sum() / np.outer(c.sum(1), c.sum(1))), 0.0)
    np.testing.assert_allclose(ppmi(cooccurrence(HAND, list(range(7)), 5, "hand")).toarray(), expected)


def test_truncated_svd_matches_numpy():
    import scipy.sparse as sp

    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((40, 40)))
    a = (q * 0.7 ** np.arange(40)) @ q.T  # symmetric, a decaying spectrum as co-occurrence matrices have

    u, s = truncated_svd(sp.csr_matrix(a), 5, seed=0)
    np.testing.assert_allclose(s, np.linalg.svd(a, compute_uv=False)[:5], rtol=1e-6)
    np.testing.assert_allclose(np.abs(u.T @ np.linalg.svd(a)[0][:, :5]), np.eye(5), atol=1e-5)


def test_collaborative_groups_items_bought_together():
    emb = collaborative(HAND, list(range(7)), dim=2, window=5, seed=0, path="hand")
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-6)
    cos = emb @ emb.T
    assert min(cos[0, 1], cos[1, 2], cos[3, 4], cos[4, 5]) > 0.9
    assert max(abs(cos[0, 3]), abs(cos[2, 5])) < 0.1
    np.testing.assert_array_equal(emb, collaborative(HAND, list(range(7)), dim=2, window=5, seed=0, path="hand"))


def test_collaborative_rejects_unknown_items():
    with pytest.raises(EmbeddingError, match="hand: field 'item 6': interaction item is not in the catalog"):
        collaborative(HAND, list(range(6)), dim=2, window=5, seed=0, path="hand")


def test_npy_bad_input_names_file_and_item(tmp_path):
    path = tmp_path / "emb.npy"
    items = [3, 5, 9]

    def fails(array, match, dim=None):
        np.save(path, array)
        with pytest.raises(EmbeddingError, match=match):
            load_npy(path, items, dim)

    fails(np.zeros((2, 4)), rf"{path}: field 'item 9': 2 rows for 3 items")
    fails(np.zeros((4, 4)), "4 rows for 3 items")
    bad = np.zeros((3, 4))
    bad[1, 2] = np.nan
    fails(bad, rf"{path}: field 'item 5': non-finite values")
    fails(np.zeros((3, 3)), "rows have 3 values, expected 4", dim=4)
    fails(np.zeros(3), "2-D")
    with pytest.raises(FileNotFoundError, match="embed.npy_path"):
        load_npy(tmp_path / "missing.npy", items)
    np.save(path, np.ones((3, 4)))
    assert load_npy(path, items, 4).dtype == np.float32


def test_item_file_bad_input(tmp_path):
    path = tmp_path / "X.item.json"
    path.write_text("{}")
    with pytest.raises(EmbeddingError, match=rf"{path}: the item file has no items"):
        item_texts(path, [0])
    path.write_text(json.dumps({"0": {"title": "a"}, "1": {"title": " ", "description": ""}}))
    with pytest.raises(EmbeddingError, match=rf"{path}: field 'item 2': item is not in the item file"):
        item_texts(path, [0, 2])
    with pytest.raises(EmbeddingError, match=rf"{path}:1: field 'item 1': no title or description"):
        item_texts(path, [0, 1])


def _tiny_hf_qwen2(directory: Path):
    """A random transformers Qwen2 with a byte-level tokenizer (256 bytes + <|endoftext|>) saved to `directory`."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    cfg = transformers.Qwen2Config(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return model, tok, torch


def test_text_embeddings_match_transformers_mean_pooled(tmp_path):
    model, tok, torch = _tiny_hf_qwen2(tmp_path / "model")
    items = {"0": {"title": "Red guitar", "description": "six strings"}, "2": {"title": "Drum"}}
    items["5"] = {"title": "A very long title that runs past the token limit", "description": ["x", "y"]}
    (tmp_path / "X.item.json").write_text(json.dumps(items))
    cfg = EmbedConfig(
        source="text", model_dir=str(tmp_path / "model"), max_tokens=24, batch_size=2, compute_dtype="float32"
    )
    ours = text_embeddings(cfg, tmp_path / "X.item.json", [0, 2, 5])
    texts = item_texts(tmp_path / "X.item.json", [0, 2, 5])
    with torch.no_grad():
        for row, text in enumerate(texts):
            ids = torch.tensor([tok.encode(text).ids[:24]])
            expected = model.model(input_ids=ids).last_hidden_state[0].mean(0).numpy()
            np.testing.assert_allclose(ours[row], expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# the job end to end


def _index_args(src: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("--data.source", "minionerec", "--data.dir", str(src), "--data.category", "Synthetic"),
        *("--data.train-file", "train.csv", "--embed.dim", "8", "--quantizer.levels", "2"),
        *("--quantizer.codebook-size", "16", "--quantizer.kmeans-iters", "10", "--output.dir", str(out), *extra),
    ]


def test_built_sids_train_with_sid_train(tmp_path):
    src = write_synthetic(tmp_path / "src", num_items=64, num_users=120, seed=0)
    out = tmp_path / "out"
    assert index_main(_index_args(src, out)) == 0
    sids, levels = read_index(out / "Synthetic.index.json")
    assert levels == 2 and len(set(sids.values())) == len(sids) == 64
    report = json.loads((out / "index_report.json").read_text())
    assert report["collisions_after"]["rate"] == 0.0 and len(report["codebook_use"]) == 2
    cfg = DataConfig(source="minionerec", dir=str(out), category="Synthetic", train_file="train.csv")
    rows, catalog, _ = load_split(cfg, "test")  # the rewritten CSVs agree with the new index
    assert catalog.sids == sids and all(r.target_sid == sids[r.target_id] for r in rows)
    for split in ("train", "valid", "test"):  # only the two SID columns change
        with open(src / f"{split}.csv") as a, open(out / f"{split}.csv") as b:
            old, new = list(csv.DictReader(a)), list(csv.DictReader(b))
        assert len(old) == len(new) > 0
        for o, n in zip(old, new, strict=True):
            assert {k: v for k, v in o.items() if "sid" not in k} == {k: v for k, v in n.items() if "sid" not in k}
            assert n["item_sid"] == sids[int(n["item_id"])]
    assert index_main(_index_args(src, tmp_path / "again")) == 0  # same inputs, same bytes
    assert (tmp_path / "again/Synthetic.index.json").read_bytes() == (out / "Synthetic.index.json").read_bytes()
    train = [
        *(sys.executable, "-m", "sid.train", "--config", str(ROOT / "configs/train/cpu/smoke.yaml")),
        *("--data.source", "minionerec", "--data.dir", str(out), "--data.category", "Synthetic"),
        *("--data.train-file", "train.csv", "--tokenizer.path", str(src), "--train.max-steps", "2"),
        *("--train.output-dir", str(tmp_path / "run"), "--eval.no-enabled", "--train.log-every", "1"),
    ]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    done = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r][-1] == 2


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    src = write_synthetic(tmp_path / "src", num_items=64, num_users=120, seed=0)
    np.save(tmp_path / "emb.npy", np.zeros((63, 8), np.float32))
    npy = ("--embed.source", "npy", "--embed.npy-path", str(tmp_path / "emb.npy"), "--embed.expected-dim", "8")
    args = _index_args(src, tmp_path / "out", *npy)
    assert index_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.count("\n") == 0 and err == f"error: {tmp_path / 'emb.npy'}: field 'item 63': 63 rows for 64 items: no row"
    )
    before = (src / "Synthetic.index.json").read_bytes()
    assert index_main(_index_args(src, src)) == 2  # never into the data directory
    assert "output.dir" in capsys.readouterr().err and (src / "Synthetic.index.json").read_bytes() == before
    (src / "Synthetic.index.json").write_text("{}")
    assert index_main(_index_args(src, tmp_path / "out")) == 2
    assert "Synthetic.index.json: the index has no items" in capsys.readouterr().err


def test_bench_tiny(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "bench/index_speed.py", "--tiny", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["results"]
    names = ["sid (JAX), first call", "sid (JAX), second call", "NumPy Lloyd"]
    sklearn = importlib.util.find_spec("sklearn") is not None
    assert [r["implementation"] for r in rows] == names + ["scikit-learn KMeans"] * sklearn
    assert rows[0]["levels"] == rows[1]["levels"]  # deterministic
    for r in rows:
        residuals = [lv["relative_residual"] for lv in r["levels"]]
        assert len(residuals) == 2 and residuals[1] < residuals[0] < 1.0
    for reference in rows[2:]:
        assert rows[0]["levels"][-1]["relative_residual"] < 1.1 * reference["levels"][-1]["relative_residual"]
    if sklearn:
        assert len(rows[3]["lloyd_iterations"]) == 2 and all(1 <= n <= 10 for n in rows[3]["lloyd_iterations"])


def test_bench_skips_sklearn_when_missing(bench, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` raise ImportError
    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    x = bench.mixture(100, 4, 5, seed=0)
    assert bench.sklearn_rows(x, argparse.Namespace(levels=1, codes=4, iters=2, seed=0)) == []
    assert "scikit-learn is not installed" in capsys.readouterr().err
