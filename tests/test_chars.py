"""nanoGPT char data: the codec on the real Tiny Shakespeare text, the 90/10 split, block sampling, download."""

import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sid.data.chars import CharBatchIterator, CharCodec, CharData, text_path
from sid.data.config import CharDataConfig


@pytest.fixture(scope="module")
def shakespeare(shared_data):
    text = (shared_data / "tinyshakespeare" / "input.txt").read_bytes().decode("utf-8")
    return text, CharData.load(CharDataConfig(data_root=str(shared_data)))


def test_codec_round_trips_the_whole_text(shakespeare):
    text, data = shakespeare
    assert data.codec.vocab_size == 65 == len(set(text))
    ids = data.codec.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text) == 1_115_394
    assert data.codec.decode(ids) == text
    # Ids follow the sorted characters, as in nanoGPT's prepare.py (stoi = {ch: i for i, ch in enumerate(chars)}).
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    assert ids[:1000].tolist() == [stoi[c] for c in text[:1000]]


def test_codec_rejects_what_it_cannot_represent():
    codec = CharCodec.from_text("hello world")
    assert codec.chars == " dehlorw"
    assert codec.decode(codec.encode("low")) == "low"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        codec.encode("hey")
    with pytest.raises(ValueError, match="ids must be in"):
        codec.decode([0, 8])
    with pytest.raises(ValueError, match="sorted"):
        CharCodec("ba")


def test_split_is_the_first_90_percent_for_training(shakespeare):
    text, data = shakespeare
    # The sizes nanoGPT's shakespeare_char/prepare.py reports: 1,003,854 train and 111,540 val characters.
    assert len(data.splits["train"]) == 1_003_854 and len(data.splits["val"]) == 111_540
    assert data.codec.decode(data.splits["val"]) == text[1_003_854:]
    with pytest.raises(ValueError, match="train_fraction"):
        CharData("abc", train_fraction=1.0)


def test_batches_are_windows_of_the_split_with_y_shifted_by_one(shakespeare):
    text, data = shakespeare
    x, y = data.get_batch("val", 16, 64, seed=0, step=3, process_index=0, process_count=1)
    assert x.shape == y.shape == (16, 64) and x.dtype == y.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    val_text = text[1_003_854:]
    for row_x, row_y in zip(x, y, strict=True):
        assert data.codec.decode(np.append(row_x, row_y[-1])) in val_text


def test_batches_are_a_function_of_split_seed_and_step(shakespeare):
    _, data = shakespeare

    def batch(split="train", seed=0, step=0):
        return data.get_batch(split, 8, 32, seed=seed, step=step, process_index=0, process_count=1)[0]

    np.testing.assert_array_equal(batch(), batch())
    for other in (batch(step=1), batch(seed=1), batch(split="val")):
        assert not np.array_equal(batch(), other)
    with pytest.raises(ValueError, match="block_size"):
        data.get_batch("val", 8, 111_540, seed=0, step=0, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="split"):
        data.get_batch("test", 8, 32, seed=0, step=0, process_index=0, process_count=1)


def test_hosts_get_disjoint_row_slices_of_the_global_batch(shakespeare):
    _, data = shakespeare
    whole = data.get_batch("train", 8, 32, seed=4, step=7, process_index=0, process_count=1)
    halves = [data.get_batch("train", 8, 32, seed=4, step=7, process_index=i, process_count=2) for i in range(2)]
    for k in range(2):
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), whole[k])
    with pytest.raises(ValueError, match="split evenly"):
        data.get_batch("train", 7, 32, seed=0, step=0, process_index=0, process_count=2)


def test_iterator_resumes_exactly_and_yields_train_batch_dicts(shakespeare):
    _, data = shakespeare
    stream = CharBatchIterator(data, "train", 4, 16, seed=2, process_index=0, process_count=1)
    first = [next(stream) for _ in range(5)]
    batch = first[0]
    x, y = data.get_batch("train", 4, 16, seed=2, step=0, process_index=0, process_count=1)
    np.testing.assert_array_equal(batch["input_ids"], x)
    np.testing.assert_array_equal(batch["targets"], y)
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(16), (4, 1)))
    assert (batch["segment_ids"] == 1).all() and all(v.dtype == np.int32 for v in batch.values())

    replay = CharBatchIterator(data, "train", 4, 16, seed=2, process_index=0, process_count=1)
    for _ in range(2):
        next(replay)
    state = json.loads(json.dumps(replay.get_state()))
    resumed = CharBatchIterator(data, "train", 4, 16, seed=2, process_index=0, process_count=1)
    resumed.set_state(state)
    for want in first[2:]:
        np.testing.assert_array_equal(next(resumed)["input_ids"], want["input_ids"])
    with pytest.raises(ValueError, match="does not match"):
        CharBatchIterator(data, "train", 4, 16, seed=3).set_state(state)


def test_missing_file_is_downloaded_from_the_url(tmp_path):
    source = tmp_path / "source.txt"
    source.write_bytes(b"To be, or not to be\r\n")
    cfg = CharDataConfig(input_path=str(tmp_path / "cache" / "input.txt"), url=source.as_uri())
    path = text_path(cfg)
    assert path == tmp_path / "cache" / "input.txt" and path.read_bytes() == source.read_bytes()
    assert CharData.load(cfg).codec.chars == "\n\r ,Tbenort"  # \r kept: no newline translation


def test_missing_file_without_network_fails_clearly(tmp_path):
    cfg = CharDataConfig(input_path=str(tmp_path / "input.txt"), url="http://127.0.0.1:9/input.txt")
    with pytest.raises(FileNotFoundError, match="downloading http://127.0.0.1:9/input.txt failed"):
        text_path(cfg)
    assert not (tmp_path / "input.txt").exists()


def test_iterator_round_trips_through_an_orbax_checkpoint_with_grains_handler(shakespeare, tmp_path):
    _, data = shakespeare
    stream = CharBatchIterator(data, "train", 4, 16, seed=0, process_index=0, process_count=1)
    next(stream)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(stream)))
        manager.wait_until_finished()
        expected = next(stream)
        fresh = CharBatchIterator(data, "train", 4, 16, seed=0, process_index=0, process_count=1)
        manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(next(fresh)["input_ids"], expected["input_ids"])
