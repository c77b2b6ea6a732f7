"""The Grain input pipeline: tokenized samples → fixed-shape, host-sharded, exactly resumable batches.

Owns how samples are laid out in batches (packed rows with segment ids, or length buckets), the per-epoch
shuffle, the exact number of steps per epoch, the per-host slice of each global batch, and the checkpointable
iterator state. Tokenizing is the caller's `encode(record) -> dict(input_ids, loss_mask[, task_id])`; it runs
lazily inside Grain's map, once per sample per epoch on the host that owns the sample's row, plus once per sample
up front for the length pass.

Layout. The length pass gives every sample's token count (truncated to `max_len`). From the lengths alone a
static *template* is built once:
- packing: best-fit decreasing over the lengths gives `num_rows` rows of slot lengths, so the row count (and
  steps per epoch) is the same in every epoch and within a few rows of the lower bound sum(lengths) / max_len;
- buckets: each sample goes to the smallest bucket that fits; a batch holds samples of one bucket only.
Each epoch is then drawn from (seed, epoch): packing fills every slot with a random sample of that slot's length
(best-fit decreasing depends only on the length sequence, so equal-length samples are interchangeable) and
shuffles the rows; buckets shuffle the samples within each bucket and the order of the batches. A step's batch
is therefore a pure function of (template, seed, global step): the iterator state is just the step, a resumed
run replays exactly, and every host can build only its own rows of the global batch.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

IGNORE_INDEX = -100
"""Target value of positions that are not supervised (prompt, padding, the last token of a segment)."""

NO_TASK = -1
"""`task_ids` value of positions that are not supervised, and of samples that name no task."""

BATCH_KEYS = ("input_ids", "positions", "segment_ids", "targets", "task_ids")
"""The arrays of every batch, each int32 [rows, length]. `task_ids` is the sample's task (its `task_id`, an index
into `sid.data.tasks.TASKS`) where the target is supervised, NO_TASK elsewhere."""

Batch = dict[str, np.ndarray]
# One global batch of a plan: (row length, rows); a row is the array of the sample indices packed into it
# (empty for an all-padding row).
PlannedBatch = tuple[int, list[np.ndarray]]


def _checked_sample(sample: Mapping[str, Any], index: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Validates one tokenized sample: equal 1-D shapes, at least one token, integer ids and a bool mask, and an
    integer `task_id` (NO_TASK if it has none). Returns (ids, mask, task)."""
    try:
        ids, mask = np.asarray(sample["input_ids"]), np.asarray(sample["loss_mask"])
        task = sample.get("task_id", NO_TASK)
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"sample {index}: expected dict(input_ids=..., loss_mask=...), got {type(sample)}") from e
    if not isinstance(task, int | np.integer) or isinstance(task, bool) or task < NO_TASK:
        raise ValueError(f"sample {index}: task_id must be an integer >= {NO_TASK}, got {task!r}")
    if ids.ndim != 1 or mask.shape != ids.shape:
        raise ValueError(f"sample {index}: input_ids {ids.shape} and loss_mask {mask.shape} must be equal 1-D shapes")
    if ids.size == 0:
        raise ValueError(f"sample {index}: no tokens")
    if not np.issubdtype(ids.dtype, np.integer) or mask.dtype != np.bool_:
        raise ValueError(f"sample {index}: input_ids must be integers and loss_mask bool, got {ids.dtype}/{mask.dtype}")
    return ids, mask, int(task)


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Packs items (longest first) each into the fullest row that still fits it, else into a new row.

    Returns the row of each slot, slots being the items in decreasing-length order, and the number of rows.
    The result depends only on the sorted length sequence, which is what lets equal-length samples swap slots.
    """
    rows_by_room: list[list[int]] = [[] for _ in range(capacity + 1)]
    has_room = np.zeros(capacity + 1, dtype=bool)
    row_of_slot = np.empty(len(lengths), dtype=np.int64)
    num_rows = 0
    for slot, length in enumerate(np.sort(lengths)[::-1].tolist()):
        room = length + int(has_room[length:].argmax())  # smallest room >= length (or `length` if none has room)
        if has_room[room]:
            row = rows_by_room[room].pop()
            has_room[room] = bool(rows_by_room[room])
        else:
            row, room = num_rows, capacity
            num_rows += 1
        row_of_slot[slot] = row
        if room > length:
            rows_by_room[room - length].append(row)
            has_room[room - length] = True
    return row_of_slot, num_rows


class BatchPlan:
    """How a set of samples becomes fixed-shape global batches of `rows_per_step` rows, epoch after epoch.

    Building it runs the length pass (`encode` over every record, lengths kept). Packing (`pack=True`) gives
    batches of shape [rows, max_len]; buckets (`pack=False`) give [rows, bucket] for the smallest bucket that
    fits each sample, the last bucket being `max_len`. A sample longer than `max_len` keeps its last `max_len`
    tokens; no sample is dropped or split. `steps_per_epoch` is exact and the same for every epoch (the final
    batch of an epoch is completed with all-padding rows).

    Attributes: `lengths` (tokens per sample after truncation), `truncated` (samples longer than max_len),
    `num_rows` (rows per epoch), `steps_per_epoch`, `fill` (fraction of an epoch's batch cells that hold real
    tokens; the rest is padding).
    """

    def __init__(
        self,
        records: Sequence[Any],
        encode: Callable[[Any], Mapping[str, Any]] | None = None,
        *,
        rows_per_step: int,
        max_len: int,
        pack: bool = True,
        buckets: Sequence[int] = (),
    ):
        if rows_per_step < 1 or max_len < 2:
            raise ValueError(f"need rows_per_step >= 1 and max_len >= 2, got {rows_per_step} and {max_len}")
        if not len(records):
            raise ValueError("no samples")
        self.records = records
        self.encode = encode
        self.rows_per_step = rows_per_step
        self.max_len = max_len
        self.pack = pack
        self.buckets: tuple[int, ...] = (max_len,) if pack else tuple(sorted({int(b) for b in buckets}))
        if not pack and (not self.buckets or self.buckets[0] < 1 or self.buckets[-1] != max_len):
            raise ValueError(f"length buckets {tuple(buckets)} must be positive with the largest equal to {max_len=}")
        full_lengths = np.array([len(self._encoded(i)[0]) for i in range(len(records))], dtype=np.int64)
        self.truncated = int(np.sum(full_lengths > max_len))
        self.lengths = np.minimum(full_lengths, max_len)
        if pack:
            row_of_slot, num_rows = _best_fit_decreasing(self.lengths, max_len)
            # Slots grouped by row: the slots of row r are _slots_by_row[_row_start[r]:_row_start[r + 1]].
            self._slots_by_row = np.argsort(row_of_slot, kind="stable")
            self._row_start = np.concatenate([[0], np.cumsum(np.bincount(row_of_slot, minlength=num_rows))])
            self.num_rows = num_rows
            self.steps_per_epoch = -(-num_rows // rows_per_step)
            cells = self.steps_per_epoch * rows_per_step * max_len
        else:
            self._bucket_of = np.searchsorted(np.array(self.buckets), self.lengths)
            counts = np.bincount(self._bucket_of, minlength=len(self.buckets))
            self.num_rows = len(records)
            steps = [-(-int(c) // rows_per_step) for c in counts]
            self.steps_per_epoch = sum(steps)
            cells = sum(s * rows_per_step * length for s, length in zip(steps, self.buckets, strict=True))
        self.fill = float(self.lengths.sum() / cells)
        self._plans: dict[tuple[int, int], list[PlannedBatch]] = {}
        self._lock = threading.Lock()

    def summary(self) -> dict[str, float]:
        """Sizes for logs and run_summary.json (tokens per epoch, steps per epoch, padding)."""
        return {
            "samples": len(self.lengths),
            "tokens": int(self.lengths.sum()),
            "truncated_samples": self.truncated,
            "rows": self.num_rows,
            "steps_per_epoch": self.steps_per_epoch,
            "fill": self.fill,
        }

    def fingerprint(self, seed: int) -> str:
        """Identifies the batch sequence (lengths, shapes, seed), so a resume onto other data fails loudly."""
        h = hashlib.sha256(repr((self.rows_per_step, self.max_len, self.pack, self.buckets, seed)).encode())
        h.update(self.lengths.tobytes())
        return h.hexdigest()[:16]

    def epoch(self, epoch: int, *, seed: int) -> list[PlannedBatch]:
        """The `steps_per_epoch` global batches of one epoch, drawn from (seed, epoch) only."""
        key = (seed, epoch)
        with self._lock:
            plan = self._plans.get(key)
        if plan is None:
            plan = self._draw_epoch(np.random.default_rng([seed, epoch]))
            with self._lock:
                # A few recent epochs: prefetch threads straddle an epoch boundary, eval may share the plan.
                self._plans[key] = plan
                while len(self._plans) > 3:
                    del self._plans[next(iter(self._plans))]
        return plan

    def _draw_epoch(self, rng: np.random.Generator) -> list[PlannedBatch]:
        n, rows = len(self.lengths), self.rows_per_step
        empty = np.zeros(0, dtype=np.int64)
        if self.pack:
            order = rng.permutation(n)
            sample_of_slot = order[np.argsort(-self.lengths[order], kind="stable")]  # random among equal lengths
            row_samples = [
                sample_of_slot[self._slots_by_row[self._row_start[r] : self._row_start[r + 1]]]
                for r in rng.permutation(self.num_rows).tolist()
            ]
            row_samples += [empty] * (self.steps_per_epoch * rows - len(row_samples))
            return [(self.max_len, row_samples[s * rows : (s + 1) * rows]) for s in range(self.steps_per_epoch)]
        batches: list[PlannedBatch] = []
        for b, length in enumerate(self.buckets):
            members = rng.permutation(np.flatnonzero(self._bucket_of == b))
            for start in range(0, len(members), rows):
                chunk = [members[i : i + 1] for i in range(start, min(start + rows, len(members)))]
                batches.append((length, chunk + [empty] * (rows - len(chunk))))
        return [batches[i] for i in rng.permutation(len(batches)).tolist()]

    def _encoded(self, index: int) -> tuple[np.ndarray, np.ndarray, int]:
        record = self.records[index]
        return _checked_sample(record if self.encode is None else self.encode(record), index)

    def _host_rows(self, process_index: int | None, process_count: int | None) -> slice:
        index = jax.process_index() if process_index is None else process_index
        count = jax.process_count() if process_count is None else process_count
        if self.rows_per_step % count or not 0 <= index < count:
            raise ValueError(f"{self.rows_per_step} rows per step cannot be split evenly over {count} hosts ({index=})")
        per_host = self.rows_per_step // count
        return slice(index * per_host, (index + 1) * per_host)

    def build(self, batch: PlannedBatch, rows: slice = slice(None)) -> Batch:
        """Tokenizes and lays out the given rows of a planned batch: the train-batch contract, int32 [rows, L]."""
        length, planned = batch[0], batch[1][rows]
        out = {k: np.zeros((len(planned), length), dtype=np.int32) for k in BATCH_KEYS}
        out["targets"].fill(IGNORE_INDEX)
        out["task_ids"].fill(NO_TASK)
        for r, samples in enumerate(planned):
            start = 0
            for segment, index in enumerate(samples.tolist(), start=1):
                ids, mask, task = self._encoded(index)
                ids, mask = ids[-self.max_len :], mask[-self.max_len :]
                if len(ids) != self.lengths[index]:
                    raise RuntimeError(
                        f"encode is not deterministic: sample {index} has {len(ids)} tokens, "
                        f"{self.lengths[index]} in the length pass"
                    )
                end = start + len(ids)
                out["input_ids"][r, start:end] = ids
                out["positions"][r, start:end] = np.arange(len(ids))
                out["segment_ids"][r, start:end] = segment
                # Position t predicts token t+1 of the same sample, and only where that token is supervised.
                out["targets"][r, start : end - 1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
                out["task_ids"][r, start : end - 1] = np.where(mask[1:], task, NO_TASK)
                start = end
        return out

    def train_iterator(
        self,
        *,
        seed: int,
        epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> PlanIterator:
        """This host's slice of every global batch, `epochs` times (None: forever), reshuffled each epoch.

        Host i of P gets rows [i*R/P, (i+1)*R/P) of each global batch of R rows; batches are built ahead in 4
        threads, 8 batches ahead.
        """
        rows = self._host_rows(process_index, process_count)
        spe = self.steps_per_epoch
        dataset = (
            grain.MapDataset.range(spe)
            .repeat(epochs)
            .map_with_index(lambda step, _: self.build(self.epoch(step // spe, seed=seed)[step % spe], rows))
        )
        options = grain.ReadOptions(num_threads=4, prefetch_buffer_size=8)
        return PlanIterator(iter(dataset.to_iter_dataset(options)), self.fingerprint(seed))

    def eval_batches(
        self, *, seed: int = 0, process_index: int | None = None, process_count: int | None = None
    ) -> grain.MapDataset:
        """This host's slice of one fixed epoch (drawn from `seed`): deterministic held-out batches.

        Random access (`len`, `ds[k]`, `ds[:n]`); the epoch is shuffled so any prefix is a fair sample.
        """
        rows = self._host_rows(process_index, process_count)
        return grain.MapDataset.range(self.steps_per_epoch).map(lambda s: self.build(self.epoch(0, seed=seed)[s], rows))


class PlanIterator(grain.DatasetIterator):
    """Host batches of a train stream, with a JSON state: `set_state(get_state())` on a fresh iterator over the
    same plan and seed continues with exactly the batches the original would have produced next. A Grain
    `DatasetIterator`, so `grain.checkpoint.CheckpointSave(iterator)` stores it in an orbax checkpoint."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.DatasetIterator, fingerprint: str):
        super().__init__(parent)
        self._fingerprint = fingerprint

    def __next__(self) -> Batch:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        """The position in the stream (a JSON-serialisable dict)."""
        return {"grain": self._parent.get_state(), "plan": self._fingerprint}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a state of `get_state`; raises if it was saved for other data, shapes or seed."""
        if state.get("plan") != self._fingerprint:
            raise ValueError(
                f"iterator state is for batch plan {state.get('plan')}, this is {self._fingerprint}: "
                "the data, tokenizer, max_len, rows per step, packing or seed changed since it was saved"
            )
        self._parent.set_state(state["grain"])
