"""The Grain pipeline: packing/bucket layouts, exact steps per epoch, per-epoch shuffles, host slices, resume."""

import json
from collections import Counter

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sid.data.pipeline import IGNORE_INDEX, NO_TASK, BatchPlan

MAX_LEN = 64
ROWS = 8
BUCKETS = (16, 32, 64)


def make_samples(n: int, seed: int = 0) -> list[dict]:
    """Random token sequences (2..80 tokens: some longer than MAX_LEN) with a random prompt/completion split."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n):
        length = int(rng.integers(2, 81)) if rng.random() < 0.1 else int(rng.integers(2, 30))
        prompt = int(rng.integers(1, length))
        ids = rng.integers(1, 50_000, size=length).astype(np.int32)
        samples.append(dict(input_ids=ids, loss_mask=np.arange(length) >= prompt))
    return samples


SAMPLES = make_samples(240)


def expected_targets(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The contract, written out per position: the next token if it is supervised, else -100; -100 at the end."""
    return np.array([ids[t + 1] if mask[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX])


def truncated(sample: dict, max_len: int = MAX_LEN) -> tuple[np.ndarray, np.ndarray]:
    return sample["input_ids"][-max_len:], sample["loss_mask"][-max_len:]


# Truncated samples by their tokens, so segments found in batches can be matched to their source.
BY_TOKENS = {tuple(truncated(s)[0].tolist()): truncated(s) for s in SAMPLES}
assert len(BY_TOKENS) == len(SAMPLES)


def plan(samples=SAMPLES, **kw) -> BatchPlan:
    """A plan over `samples` encoded lazily (records are indices, as a reader's rows would be)."""
    kw = dict(rows_per_step=ROWS, max_len=MAX_LEN, pack=True, buckets=BUCKETS) | kw
    return BatchPlan(list(range(len(samples))), lambda i: samples[i], **kw)


def segments(batch: dict) -> list[tuple[int, ...]]:
    """Every packed sample of a batch, checking the layout invariants on the way; returns their tokens."""
    ids, pos, seg, tgt = (batch[k] for k in ("input_ids", "positions", "segment_ids", "targets"))
    assert all(a.dtype == np.int32 and a.shape == ids.shape for a in (ids, pos, seg, tgt))
    pad = seg == 0
    assert (ids[pad] == 0).all() and (pos[pad] == 0).all() and (tgt[pad] == IGNORE_INDEX).all()
    found = []
    for r in range(ids.shape[0]):
        present = np.unique(seg[r][seg[r] > 0])
        np.testing.assert_array_equal(present, np.arange(1, len(present) + 1))  # segment ids 1..k
        for s in present:
            where = np.flatnonzero(seg[r] == s)
            np.testing.assert_array_equal(where, np.arange(where[0], where[0] + len(where)))  # contiguous
            np.testing.assert_array_equal(pos[r, where], np.arange(len(where)))  # positions restart at 0
            tokens = tuple(ids[r, where].tolist())
            assert tokens in BY_TOKENS, "a segment that is no (whole, suffix-truncated) sample"
            np.testing.assert_array_equal(tgt[r, where], expected_targets(*BY_TOKENS[tokens]))
            found.append(tokens)
    return found


def take(iterator, n: int) -> list[dict]:
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("pack", [True, False])
def test_an_epoch_holds_every_sample_once_whole_and_steps_per_epoch_is_exact(pack):
    p = plan(pack=pack)
    batches = list(p.train_iterator(seed=3, epochs=2, process_index=0, process_count=1))
    assert len(batches) == 2 * p.steps_per_epoch
    for e in range(2):
        epoch = batches[e * p.steps_per_epoch : (e + 1) * p.steps_per_epoch]
        found = Counter(t for b in epoch for t in segments(b))
        assert found == Counter(BY_TOKENS.keys()), "a sample was dropped, duplicated or split"
        real = sum(int((b["segment_ids"] > 0).sum()) for b in epoch)
        cells = sum(b["input_ids"].size for b in epoch)
        assert real == p.summary()["tokens"] == sum(len(truncated(s)[0]) for s in SAMPLES)
        assert p.fill == pytest.approx(real / cells)
    for b in batches:
        assert b["input_ids"].shape[0] == ROWS
        assert b["input_ids"].shape[1] == MAX_LEN if pack else b["input_ids"].shape[1] in BUCKETS


@pytest.mark.parametrize("pack", [True, False])
def test_task_ids_mark_each_samples_supervised_targets_with_its_task(pack):
    tasked = [dict(s, task_id=i % 5) for i, s in enumerate(SAMPLES)]
    task_of = {tuple(truncated(s)[0].tolist()): s["task_id"] for s in tasked}
    p = plan(tasked, pack=pack)
    found = 0
    for batch in p.eval_batches():
        tasks, tgt, seg, ids = batch["task_ids"], batch["targets"], batch["segment_ids"], batch["input_ids"]
        assert tasks.dtype == np.int32 and tasks.shape == ids.shape
        assert (tasks[tgt == IGNORE_INDEX] == NO_TASK).all()
        for r, s in {(r, seg[r, c]) for r, c in zip(*np.nonzero(seg), strict=True)}:
            where = seg[r] == s
            want = task_of[tuple(ids[r, where].tolist())]
            np.testing.assert_array_equal(tasks[r, where], np.where(tgt[r, where] >= 0, want, NO_TASK))
            found += 1
    assert found == len(SAMPLES)
    # Samples without a task_id: every position is NO_TASK; a bad task_id is refused.
    assert all((b["task_ids"] == NO_TASK).all() for b in plan().eval_batches())
    for bad in (-2, 1.5, True, "next_sid"):
        with pytest.raises(ValueError, match="task_id"):
            BatchPlan([dict(SAMPLES[0], task_id=bad)], rows_per_step=1, max_len=MAX_LEN)


def naive_best_fit_decreasing(lengths, capacity) -> int:
    """Textbook BFD: longest first, into the row with the least room that still fits."""
    rooms: list[int] = []
    for length in sorted(lengths, reverse=True):
        fits = [r for r in range(len(rooms)) if rooms[r] >= length]
        if fits:
            best = min(fits, key=lambda r: rooms[r])
            rooms[best] -= length
        else:
            rooms.append(capacity - length)
    return len(rooms)


def test_packing_uses_as_few_rows_as_best_fit_decreasing():
    p = plan()
    lengths = [len(truncated(s)[0]) for s in SAMPLES]
    assert p.num_rows == naive_best_fit_decreasing(lengths, MAX_LEN)
    assert p.num_rows >= -(-sum(lengths) // MAX_LEN)
    assert p.steps_per_epoch == -(-p.num_rows // ROWS)
    assert p.truncated == sum(len(s["input_ids"]) > MAX_LEN for s in SAMPLES) > 0


def test_over_long_sample_keeps_its_last_max_len_tokens():
    ids = np.arange(1, 101, dtype=np.int32)
    sample = dict(input_ids=ids, loss_mask=np.arange(100) >= 90)
    p = BatchPlan([sample], rows_per_step=1, max_len=MAX_LEN)
    (batch,) = list(p.train_iterator(seed=0, epochs=1, process_index=0, process_count=1))
    np.testing.assert_array_equal(batch["input_ids"][0], np.arange(37, 101))
    np.testing.assert_array_equal(batch["positions"][0], np.arange(64))
    np.testing.assert_array_equal(batch["segment_ids"][0], np.ones(64))
    # Tokens 91..100 are supervised: predicted from positions holding 90..99; the last token predicts nothing.
    want = np.full(64, IGNORE_INDEX)
    want[53:63] = np.arange(91, 101)
    np.testing.assert_array_equal(batch["targets"][0], want)
    assert p.truncated == 1 and p.lengths.tolist() == [64]


def planned_epoch(p: BatchPlan, seed: int, epoch: int) -> list[list[tuple[int, ...]]]:
    return [[tuple(r.tolist()) for r in rows] for _, rows in p.epoch(epoch, seed=seed)]


@pytest.mark.parametrize("pack", [True, False])
def test_each_epoch_is_a_new_shuffle_determined_by_the_seed(pack):
    a, b = plan(pack=pack), plan(pack=pack)
    assert planned_epoch(a, 1, 0) == planned_epoch(b, 1, 0)
    assert planned_epoch(a, 1, 1) == planned_epoch(b, 1, 1)
    assert planned_epoch(a, 1, 0) != planned_epoch(a, 1, 1)
    assert planned_epoch(a, 1, 0) != planned_epoch(a, 2, 0)
    if pack:  # rows are refilled, not only reordered: which samples share a row changes between epochs
        rows = [{frozenset(r) for batch in planned_epoch(a, 1, e) for r in batch if r} for e in (0, 1)]
        assert rows[0] != rows[1]
    # The actual batches follow the plan: epoch 1 of the stream is what the plan says.
    it = a.train_iterator(seed=1, epochs=2, process_index=0, process_count=1)
    stream = list(it)[a.steps_per_epoch :]
    assert_same_batches(stream, [a.build(batch) for batch in a.epoch(1, seed=1)])


@pytest.mark.parametrize("pack", [True, False])
def test_resume_from_a_saved_state_replays_the_uninterrupted_stream(pack):
    p = plan(pack=pack)
    uninterrupted = take(p.train_iterator(seed=5, process_index=0, process_count=1), p.steps_per_epoch + 6)
    k = p.steps_per_epoch - 2  # resume two steps before an epoch boundary
    it = p.train_iterator(seed=5, process_index=0, process_count=1)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    resumed = plan(pack=pack).train_iterator(seed=5, process_index=0, process_count=1)
    resumed.set_state(state)
    assert_same_batches(take(resumed, 8), uninterrupted[k : k + 8])


def test_a_state_saved_for_other_data_or_seed_is_refused():
    it = plan().train_iterator(seed=0, process_index=0, process_count=1)
    next(it)
    state = it.get_state()
    with pytest.raises(ValueError, match="batch plan"):
        plan().train_iterator(seed=1, process_index=0, process_count=1).set_state(state)
    with pytest.raises(ValueError, match="batch plan"):
        plan(SAMPLES[:-1]).train_iterator(seed=0, process_index=0, process_count=1).set_state(state)


@pytest.mark.parametrize("pack", [True, False])
def test_two_hosts_see_disjoint_halves_that_make_up_the_global_batch(pack):
    p = plan(pack=pack)
    whole = list(p.train_iterator(seed=2, epochs=1, process_index=0, process_count=1))
    halves = [list(p.train_iterator(seed=2, epochs=1, process_index=i, process_count=2)) for i in range(2)]
    seen = [set(), set()]
    for step, batch in enumerate(whole):
        for i in range(2):
            for k in batch:
                np.testing.assert_array_equal(halves[i][step][k], batch[k][i * ROWS // 2 : (i + 1) * ROWS // 2])
            seen[i] |= set(segments(halves[i][step]))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(BY_TOKENS)


def test_bucket_batches_use_the_smallest_bucket_that_fits_each_sample():
    p = plan(pack=False)
    shapes = set()
    for batch in p.train_iterator(seed=0, epochs=1, process_index=0, process_count=1):
        width = batch["input_ids"].shape[1]
        shapes.add(batch["input_ids"].shape)
        for tokens in segments(batch):
            assert min(b for b in BUCKETS if b >= len(tokens)) == width
        assert (batch["segment_ids"].max(axis=1) <= 1).all()  # one sample per row
    assert shapes == {(ROWS, b) for b in BUCKETS}


def test_eval_batches_are_deterministic_and_cover_the_set_once():
    p = plan()
    a, b = p.eval_batches(process_index=0, process_count=1), plan().eval_batches(process_index=0, process_count=1)
    assert len(a) == p.steps_per_epoch
    assert_same_batches(list(a), [b[i] for i in range(len(b))])
    assert Counter(t for batch in a for t in segments(batch)) == Counter(BY_TOKENS.keys())
    assert_same_batches(list(p.eval_batches()), list(a))  # defaults to jax.process_index()/process_count() = 0/1


def test_bad_input_is_rejected():
    ok = dict(input_ids=np.array([1, 2, 3]), loss_mask=np.array([False, True, True]))
    bad = {
        "equal 1-D shapes": dict(input_ids=np.array([1, 2]), loss_mask=np.array([True])),
        "no tokens": dict(input_ids=np.zeros(0, np.int32), loss_mask=np.zeros(0, bool)),
        "integers": dict(input_ids=np.array([1.0, 2.0]), loss_mask=np.array([False, True])),
        "bool": dict(input_ids=np.array([1, 2]), loss_mask=np.array([0, 1])),
        "expected dict": [1, 2, 3],
    }
    for match, sample in bad.items():
        with pytest.raises(ValueError, match=match):
            BatchPlan([ok, sample], rows_per_step=2, max_len=8)
    with pytest.raises(ValueError, match="largest equal to"):
        BatchPlan([ok], rows_per_step=2, max_len=8, pack=False, buckets=(4,))
    with pytest.raises(ValueError, match="no samples"):
        BatchPlan([], rows_per_step=2, max_len=8)
    with pytest.raises(ValueError, match="split evenly"):
        BatchPlan([ok], rows_per_step=3, max_len=8).train_iterator(seed=0, process_index=0, process_count=2)


def test_an_encode_that_changes_between_passes_is_caught():
    calls = Counter()

    def flaky(i):
        calls[i] += 1
        n = 3 if calls[i] == 1 else 4
        return dict(input_ids=np.arange(1, n + 1), loss_mask=np.ones(n, bool))

    p = BatchPlan([0, 1], flaky, rows_per_step=1, max_len=8)
    with pytest.raises(RuntimeError, match="not deterministic"):
        next(p.train_iterator(seed=0, process_index=0, process_count=1))


def test_iterator_round_trips_through_an_orbax_checkpoint_with_grains_handler(tmp_path):
    p = plan()
    it = p.train_iterator(seed=0, process_index=0, process_count=1)
    take(it, 3)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = take(it, 4)
        fresh = plan().train_iterator(seed=0, process_index=0, process_count=1)
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same_batches(take(fresh, 4), expected)
