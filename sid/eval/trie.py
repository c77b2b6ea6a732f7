"""The SID trie: every catalog SID as dense int32 tables that constrained beam search gathers from on device.

Layout (``TrieTables``, replicated on every device):

- Nodes are numbered globally, level by level: the root is 0, then the distinct 1-token prefixes, then the distinct
  2-token prefixes, ..., then the leaves (distinct full SIDs, ids ``leaf_offset .. leaf_offset + num_leaves - 1``).
  Within a level nodes are in lexicographic order of their token-id paths, so leaf ``i`` is the ``i``-th SID in
  that order and the layout does not depend on the order of the catalog.
- ``codes[t, j]``: the vocab id of the ``j``-th candidate token of decode step ``t`` (ascending vocab ids; columns
  past the level's codebook are padding). Steps ``0 .. depth-1`` are the SID levels; the last steps are the tokens
  that end every completion (``"\\n"`` then EOS, as upstream's ``"{SID}\\n" + EOS``), one candidate each.
- ``children[n, j]``: the node reached from node ``n`` with token ``codes[level(n), j]``, or -1. A leaf's row holds
  its own id in column 0 and -1 elsewhere, so the forced end tokens keep a beam on its leaf.

So the allowed tokens of a beam at node ``n`` are ``children[n] >= 0`` and their ids ``codes[t]``: one row gather
per step, no Python at decode time. Items that share a SID share a leaf; ``SidTrie`` keeps the host-side maps from
leaves back to SID strings and item ids.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from sid.data.tokenizer import split_sid


class TrieTables(eqx.Module):
    """The device-side trie (see the module docstring for the layout)."""

    children: Int[Array, "nodes codes"]
    codes: Int[Array, "steps codes"]
    depth: int = eqx.field(static=True)
    leaf_offset: int = eqx.field(static=True)
    num_leaves: int = eqx.field(static=True)

    @property
    def num_steps(self) -> int:
        """Decode steps: the SID levels plus the end tokens."""
        return self.codes.shape[0]


@dataclass(frozen=True)
class SidTrie:
    """A catalog's SIDs as a trie: device tables for beam search plus the host maps from leaves to SIDs and items."""

    tables: TrieTables
    """Dense tables gathered at every decode step."""
    sids: tuple[str, ...]
    """SID string of each leaf (leaf order)."""
    leaf_items: tuple[tuple[Hashable, ...], ...]
    """Item ids sharing each leaf's SID, in catalog order."""
    paths: np.ndarray
    """int32 [num_leaves, depth]: the vocab ids of each leaf's SID tokens."""

    @property
    def depth(self) -> int:
        """Tokens per SID."""
        return self.tables.depth

    @property
    def num_leaves(self) -> int:
        """Distinct SIDs."""
        return len(self.sids)

    def items_by_sid(self) -> dict[str, tuple[Hashable, ...]]:
        """SID string -> the item ids that carry it."""
        return dict(zip(self.sids, self.leaf_items, strict=True))

    def predictions(self, leaves: np.ndarray) -> list[list[str]]:
        """SID strings per prompt from beam-search leaf ids [B, K]; invalid beams (leaf -1) are dropped, so a row
        holds fewer than K SIDs only when fewer than K catalog SIDs exist."""
        leaves = np.asarray(leaves)
        if leaves.ndim != 2:
            raise ValueError(f"leaves must be [batch, beams], got shape {leaves.shape}")
        return [[self.sids[leaf] for leaf in row if leaf >= 0] for row in leaves.tolist()]


def build_trie(item_sids: Mapping[Hashable, str], token_ids: Mapping[str, int], end_ids: Sequence[int]) -> SidTrie:
    """Build the trie of a catalog.

    Args:
      item_sids: item id -> SID string (e.g. ``"<a_1><b_2><c_3>"``; ``Catalog.sids``). Every SID must have the same
        number of tokens (any depth; any codebook sizes). Several items may share a SID.
      token_ids: token string -> vocab id (the tokenizer's vocabulary, SID tokens included).
      end_ids: vocab ids forced after the SID and added to its score, in order (upstream: ``"\\n"`` then EOS).

    Raises ValueError on an empty catalog, a malformed SID, mixed depths, or a SID token missing from ``token_ids``.
    """
    end_ids = tuple(int(i) for i in end_ids)
    leaf_of_path, sid_of_path = _token_paths(item_sids, token_ids)
    paths = sorted(leaf_of_path)
    depth = len(paths[0])
    level_codes = [sorted({p[d] for p in paths}) for d in range(depth)]
    level_nodes = _number_nodes(paths, depth)
    width = max(max(len(c) for c in level_codes), 1)
    leaf_offset = next(iter(level_nodes[depth].values()))
    tables = TrieTables(
        children=jnp.asarray(_children(level_nodes, level_codes, width)),
        codes=jnp.asarray(_codes(level_codes, end_ids, width)),
        depth=depth,
        leaf_offset=int(leaf_offset),
        num_leaves=len(paths),
    )
    return SidTrie(
        tables=tables,
        sids=tuple(sid_of_path[p] for p in paths),
        leaf_items=tuple(tuple(leaf_of_path[p]) for p in paths),
        paths=np.asarray(paths, dtype=np.int32).reshape(len(paths), depth),
    )


def _token_paths(
    item_sids: Mapping[Hashable, str], token_ids: Mapping[str, int]
) -> tuple[dict[tuple[int, ...], list[Hashable]], dict[tuple[int, ...], str]]:
    """Each SID's vocab-id path -> the items that carry it, and -> its SID string; checks every SID (`build_trie`)."""
    if not item_sids:
        raise ValueError("empty catalog: no SIDs to build a trie from")
    depth = None
    leaf_of_path: dict[tuple[int, ...], list[Hashable]] = {}
    sid_of_path: dict[tuple[int, ...], str] = {}
    for item, sid in item_sids.items():
        tokens = split_sid(sid)
        if tokens is None:
            raise ValueError(f"item {item!r}: not a SID (expected <x_n> tokens concatenated): {sid!r}")
        if depth is None:
            depth = len(tokens)
        elif len(tokens) != depth:
            raise ValueError(f"mixed SID depths: item {item!r} has {len(tokens)} tokens ({sid}), others have {depth}")
        missing = [t for t in tokens if t not in token_ids]
        if missing:
            raise ValueError(f"SID token(s) {missing} of item {item!r} ({sid}) are not in the tokenizer vocabulary")
        path = tuple(int(token_ids[t]) for t in tokens)
        leaf_of_path.setdefault(path, []).append(item)
        sid_of_path.setdefault(path, sid)
    return leaf_of_path, sid_of_path


def _number_nodes(paths: list[tuple[int, ...]], depth: int) -> list[dict[tuple[int, ...], int]]:
    """Per level 0..depth, each distinct prefix -> its global node id: level by level, and within a level in
    lexicographic order of the prefixes (`paths` are sorted, so their prefixes come out sorted)."""
    level_nodes: list[dict[tuple[int, ...], int]] = []
    next_id = 0
    for d in range(depth + 1):
        nodes: dict[tuple[int, ...], int] = {}
        for p in paths:
            if p[:d] not in nodes:
                nodes[p[:d]] = next_id + len(nodes)
        level_nodes.append(nodes)
        next_id += len(nodes)
    return level_nodes


def _children(level_nodes: list[dict[tuple[int, ...], int]], level_codes: list[list[int]], width: int) -> np.ndarray:
    """`TrieTables.children`: each node's child per candidate column; each leaf points to itself in column 0."""
    depth = len(level_codes)
    num_nodes = sum(len(nodes) for nodes in level_nodes)
    children = np.full((num_nodes, width), -1, dtype=np.int32)
    for d in range(depth):
        column = {code: j for j, code in enumerate(level_codes[d])}
        for child_path, child in level_nodes[d + 1].items():
            children[level_nodes[d][child_path[:-1]], column[child_path[-1]]] = child
    leaf_ids = np.fromiter(level_nodes[depth].values(), dtype=np.int32)
    children[leaf_ids, 0] = leaf_ids
    return children


def _codes(level_codes: list[list[int]], end_ids: tuple[int, ...], width: int) -> np.ndarray:
    """`TrieTables.codes`: each SID level's candidate vocab ids (ascending, zero-padded), then one end token a step."""
    depth = len(level_codes)
    codes = np.zeros((depth + len(end_ids), width), dtype=np.int32)
    for d, level in enumerate(level_codes):
        codes[d, : len(level)] = level
    codes[depth:, 0] = end_ids
    return codes
