"""The text tokenizer (`tokenizers` library) built from HF files, extended with atomic SID tokens.

Owns the SID token syntax too: an SID token is `<x_n>` (level letter x = a, b, c, ..., code n), and an item's
SID is its tokens concatenated, e.g. `<a_12><b_200><c_7>`.

Construction follows what `transformers` does for Qwen2 (byte-level BPE, NFC, the Qwen2 split regex), so ids
match `AutoTokenizer` on the same files. The SID tokens are appended in numeric order per level
(`<a_0>`, `<a_1>`, ..., `<a_255>`, `<b_0>`, ...), each one id that the BPE never splits.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sid.data.config import TokenizerConfig
from sid.paths import resolve

SID_TOKEN = re.compile(r"<([a-z])_(\d+)>")

# transformers' Qwen2Tokenizer pre-tokenizer regex (also in ../shared/data/README.md).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def split_sid(sid: str) -> list[str] | None:
    """The tokens of an SID string (`'<a_1><b_2>'` -> `['<a_1>', '<b_2>']`), or None if it is not one."""
    tokens = SID_TOKEN.findall(sid)
    if not tokens or "".join(f"<{lv}_{n}>" for lv, n in tokens) != sid:
        return None
    return [f"<{lv}_{n}>" for lv, n in tokens]


def sid_token_key(token: str) -> tuple[str, int]:
    """Sort key putting SID tokens in level order, then numeric code order (`<a_2>` before `<a_10>`)."""
    m = SID_TOKEN.fullmatch(token)
    if m is None:
        raise ValueError(f"not an SID token: {token!r}")
    return m.group(1), int(m.group(2))


@dataclass(frozen=True)
class SIDTokenizer:
    """A `tokenizers.Tokenizer` with the SID tokens added, plus the ids and sizes the trainer needs."""

    tokenizer: Tokenizer
    eos_id: int
    """Appended after every completion (the token the model learns to stop with)."""
    pad_id: int
    """Id used for padding (never supervised)."""
    base_vocab_size: int
    """Tokens before the SID tokens were added (151,646 for the Qwen2 files here)."""
    vocab_size: int
    """Tokens after (the embedding needs at least this many rows)."""
    sid_levels: int
    """Number of SID levels among the added tokens (3 for MiniOneRec, 4 for LETTER)."""
    sid_tokens: tuple[str, ...]
    """The SID tokens in id order."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS are added (Qwen has no BOS)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel in Rust)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; SID tokens are ordinary (non-special) tokens and always decode."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int:
        """Id of one token (e.g. an SID token); KeyError if it is not in the vocabulary."""
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config / special_tokens_map: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _from_vocab_merges(d: Path, config: dict[str, Any]) -> Tokenizer:
    """Qwen2's byte-level BPE from vocab.json + merges.txt, built as transformers' Qwen2Tokenizer does."""
    tok = Tokenizer(BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    tok.normalizer = normalizers.NFC()
    add_prefix_space = bool(config.get("add_prefix_space") or False)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Added tokens (specials like <|endoftext|>) come with fixed ids; adding them in id order reproduces those
    # ids, which is checked so a gap in the files fails here instead of shifting every later id.
    added: dict[int, dict[str, Any]] = {}
    for i, entry in config.get("added_tokens_decoder", {}).items():
        added[int(i)] = entry
    for content, i in _read_json(d / "added_tokens.json").items():
        added.setdefault(int(i), {"content": content, "special": True})
    for i in sorted(added):
        e = added[i]
        token = AddedToken(
            e["content"],
            single_word=e.get("single_word", False),
            lstrip=e.get("lstrip", False),
            rstrip=e.get("rstrip", False),
            normalized=e.get("normalized", False),
            special=e.get("special", True),
        )
        if token.special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])
        got = tok.token_to_id(e["content"])
        if got != i:
            raise ValueError(f"{d}: added token {e['content']!r} should have id {i} but got {got} (missing ids?)")
    return tok


def build_tokenizer(cfg: TokenizerConfig, sid_tokens: Iterable[str] | None, data_root: str = "") -> SIDTokenizer:
    """Load the HF tokenizer files at `cfg.path` and append `sid_tokens` (if `cfg.add_sid_tokens`).

    The files are tokenizer.json if present, else vocab.json + merges.txt (+ tokenizer_config.json /
    added_tokens.json for the special tokens). `sid_tokens` may come in any order and with repeats; they are
    added once each in level order, then numeric order. Tokens already in the vocabulary keep their id.
    """
    d = resolve(cfg.path, data_root)
    if not d.is_dir():
        raise FileNotFoundError(f"tokenizer directory {d} not found (tokenizer.path={cfg.path!r})")
    config = _read_json(d / "tokenizer_config.json")
    if (d / "tokenizer.json").is_file():
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        tok = _from_vocab_merges(d, config)
    else:
        raise FileNotFoundError(f"{d}: needs tokenizer.json, or vocab.json + merges.txt")

    special_map = _read_json(d / "special_tokens_map.json")

    def special_id(name: str, fallback: str | None) -> int:
        content = (
            (cfg.eos_token if name == "eos_token" else None)
            or _token_content(config.get(name))
            or _token_content(special_map.get(name))
            or fallback
        )
        i = tok.token_to_id(content) if content else None
        if i is None:
            raise ValueError(f"{d}: no usable {name} ({content!r}); set tokenizer.eos_token")
        return i

    eos_id = special_id("eos_token", "<|endoftext|>")
    pad_id = special_id("pad_token", tok.id_to_token(eos_id))
    base_vocab_size = tok.get_vocab_size(with_added_tokens=True)

    ordered: tuple[str, ...] = ()
    if cfg.add_sid_tokens and sid_tokens is not None:
        ordered = tuple(sorted(set(sid_tokens), key=sid_token_key))
        new = [AddedToken(t, normalized=False, special=False) for t in ordered if tok.token_to_id(t) is None]
        tok.add_tokens(new)
    return SIDTokenizer(
        tokenizer=tok,
        eos_id=eos_id,
        pad_id=pad_id,
        base_vocab_size=base_vocab_size,
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        sid_levels=len({sid_token_key(t)[0] for t in ordered}),
        sid_tokens=ordered,
    )
