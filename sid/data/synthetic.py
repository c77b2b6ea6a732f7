"""A seeded synthetic recommendation dataset in MiniOneRec format, so the tool runs without downloads.

The catalog has 3-level hierarchical SIDs (codebook size k per level, the smallest k with k^3 >= 2 * items;
8/8/8 for 256 items) and every SID is unique. Items sit on one hidden cycle; consecutive items on it share
their first code (and mostly their second), so the SID hierarchy is meaningful. Each user walks the cycle:
the next item is the last item's successor with probability 0.8, else a random item with the same first
code (0.15), else any item (0.05). A model that learns "SID -> successor's SID" therefore beats chance
(10/items for HR@10) by far. Titles are pseudo-words, one per code and level, so SID <-> title is learnable.

Splits are leave-one-out per user with histories of at most 10 items (MiniOneRec's cap): every prefix of
seq[:-2] is a train row, seq[-2] is valid, seq[-1] is test.

Only `random.Random.random()` is used, the one stream Python guarantees across versions, so the same
arguments give byte-identical files everywhere.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sid.data.config import TasksConfig
from sid.data.minionerec import CSV_COLUMNS, load_catalog, read_csv
from sid.data.tasks import build_sft_samples

P_SUCCESSOR = 0.8
P_SAME_CLUSTER = 0.15
MIN_LEN, MAX_LEN = 5, 15
MAX_HISTORY = 10
_SYLLABLES = ("ba", "ke", "di", "lo", "mu", "na", "pe", "ri", "so", "tu", "va", "ze", "ho", "gi", "fa", "ju")
_ENDINGS = ("x", "n", "r")


SYNTHETIC_VOCAB = 512
"""Size of the synthetic dataset's own BPE tokenizer (before SID tokens are added)."""


def _randbelow(rng: random.Random, n: int) -> int:
    return min(int(rng.random() * n), n - 1)


def _shuffled(rng: random.Random, n: int) -> list[int]:
    """A permutation of range(n) (Fisher-Yates on `random()` only, for cross-version determinism)."""
    out = list(range(n))
    for i in range(n - 1, 0, -1):
        j = _randbelow(rng, i + 1)
        out[i], out[j] = out[j], out[i]
    return out


def codebook_size(num_items: int) -> int:
    """Codes per level: the smallest k with k^3 >= 2 * num_items (room for unique SIDs within each cluster)."""
    k = 2
    while k**3 < 2 * num_items:
        k += 1
    return k


def code_word(level: int, code: int) -> str:
    """The title word of one code at one level (unique per level and code < 256)."""
    low, high = code % 16, code // 16
    return (_SYLLABLES[low] + _SYLLABLES[(high + 5 * low + 7 * level) % 16] + _ENDINGS[level]).capitalize()


def _catalog(rng: random.Random, n: int) -> tuple[list[int], list[tuple[int, int, int]]]:
    """(cycle: item ids in walk order, codes[item] = (a, b, c))."""
    k = codebook_size(n)
    cycle = _shuffled(rng, n)
    a_label = _shuffled(rng, k)
    codes: list[tuple[int, int, int]] = [(0, 0, 0)] * n
    # Contiguous runs of the cycle share a first code; within a run, shorter runs share the second code.
    clusters: dict[int, list[int]] = {}
    for p in range(n):
        clusters.setdefault(p * k // n, []).append(p)
    for a, positions in clusters.items():
        b_label = _shuffled(rng, k)
        groups: dict[int, list[int]] = {}
        for j, p in enumerate(positions):
            groups.setdefault(j * k // len(positions), []).append(p)
        for b, members in groups.items():
            c_label = _shuffled(rng, k)  # distinct third codes inside each (a, b): SIDs are unique
            for c, p in enumerate(members):
                codes[cycle[p]] = (a_label[a], b_label[b], c_label[c])
    return cycle, codes


def _sequences(
    rng: random.Random, cycle: list[int], codes: list[tuple[int, int, int]], num_users: int
) -> list[list[int]]:
    n = len(cycle)
    successor = {cycle[p]: cycle[(p + 1) % n] for p in range(n)}
    by_first: dict[int, list[int]] = {}
    for item in range(n):
        by_first.setdefault(codes[item][0], []).append(item)
    seqs = []
    for _ in range(num_users):
        length = MIN_LEN + _randbelow(rng, MAX_LEN - MIN_LEN + 1)
        seq = [_randbelow(rng, n)]
        while len(seq) < length:
            u, last = rng.random(), seq[-1]
            if u < P_SUCCESSOR:
                seq.append(successor[last])
            elif u < P_SUCCESSOR + P_SAME_CLUSTER:
                cluster = by_first[codes[last][0]]
                seq.append(cluster[_randbelow(rng, len(cluster))])
            else:
                seq.append(_randbelow(rng, n))
        seqs.append(seq)
    return seqs


def _write(path: Path, data: bytes) -> bool:
    """Write atomically, and not at all when the file already has these bytes (concurrent hosts, stable mtime).
    Returns whether the file changed."""
    if path.is_file() and path.read_bytes() == data:
        return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return True


def write_synthetic(
    out_dir: str | Path, *, num_items: int = 256, num_users: int = 600, seed: int = 0, category: str = "Synthetic"
) -> Path:
    """Write train.csv, valid.csv, test.csv, info.txt, `{category}.index.json` and `{category}.item.json` into
    `out_dir` (created if needed) and return it. Same arguments -> byte-identical files."""
    if num_items < 2 or num_users < 1:
        raise ValueError(f"need at least 2 items and 1 user, got {num_items} items and {num_users} users")
    rng = random.Random(seed)
    cycle, codes = _catalog(rng, num_items)
    seqs = _sequences(rng, cycle, codes, num_users)
    sids = ["<a_{}><b_{}><c_{}>".format(*c) for c in codes]
    titles = [f"{code_word(1, b)} {code_word(2, c)} {code_word(0, a)}" for a, b, c in codes]

    splits: dict[str, list[list[str]]] = {"train": [], "valid": [], "test": []}
    for u, seq in enumerate(seqs):
        n = len(seq)
        targets = [("train", t) for t in range(1, n - 2)] + [("valid", n - 2), ("test", n - 1)]
        for split, t in targets:
            hist = seq[max(0, t - MAX_HISTORY) : t]
            splits[split].append(
                [
                    f"U{u:05d}",
                    str([titles[i] for i in hist]),
                    titles[seq[t]],
                    str(hist),
                    str(seq[t]),
                    str([sids[i] for i in hist]),
                    sids[seq[t]],
                ]
            )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    changed = False
    for split, rows in splits.items():
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
        changed |= _write(out / f"{split}.csv", buf.getvalue().encode("utf-8"))
    info = "".join(f"{sids[i]}\t{titles[i]}\t{i}\n" for i in range(num_items))
    changed |= _write(out / "info.txt", info.encode("utf-8"))
    index = {str(i): [f"<a_{a}>", f"<b_{b}>", f"<c_{c}>"] for i, (a, b, c) in enumerate(codes)}
    changed |= _write(out / f"{category}.index.json", json.dumps(index).encode("utf-8"))
    # Descriptions as Amazon's metadata dumps write them: a Python list literal in a string.
    items = {
        str(i): {
            "title": titles[i],
            "description": str([f"The {titles[i]}, a synthetic item."]),
            "brand": "",
            "categories": "",
        }
        for i in range(num_items)
    }
    changed |= _write(out / f"{category}.item.json", json.dumps(items, indent=2).encode("utf-8"))
    if changed or not (out / "tokenizer.json").is_file():  # same files, same tokenizer: skip retraining
        _write_tokenizer(out, category)
    return out


def _write_tokenizer(out: Path, category: str) -> None:
    """A small byte-level BPE (tokenizer.json, 512 tokens) trained on this catalog's SFT text, so the embedded
    data needs no download and a tiny model trains on a CPU (Qwen's 151k vocab would dominate its cost)."""

    catalog = load_catalog(out, category)
    rows = read_csv(out / "train.csv", catalog)[:200]
    tasks = TasksConfig(next_sid=True, alignment=True, fusion=True, title_history=True)
    corpus = [s.prompt + s.completion for s in build_sft_samples(rows, catalog, tasks, "synthetic items")]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SYNTHETIC_VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)  # deterministic for the same corpus
    _write(out / "tokenizer.json", tok.to_str().encode("utf-8"))
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    _write(out / "tokenizer_config.json", json.dumps(config).encode("utf-8"))
