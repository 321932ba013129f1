"""Exact and near-duplicate removal over all sources.

Exact: documents with the same hash of their normalised text; the first one (in input order)
is kept. Near: MinHash signatures of word n-grams are cut into `bands` × `rows`; documents
that agree on every row of some band become candidate pairs (banded LSH). A candidate pair
is kept when its signature agreement is plausible for the Jaccard threshold (above the
threshold minus three standard errors of the estimate, so that pairs truly at the threshold
are almost never rejected), pairs are joined into clusters (union-find), and each cluster
keeps exactly one document: the first in input order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from loom.core.errors import LoomError
from loom.data.hashing import CJK_MODES, CJK_NGRAM, MAX_HASH32, CjkMode, mix64

_STAR_ABOVE = 64  # buckets larger than this compare members with the first one only


@dataclass
class DedupConfig:
    exact: bool = True
    near: bool = True
    threshold: float = 0.8  # Jaccard similarity of token n-gram sets
    ngram: int = 5
    cjk: CjkMode = "chars"  # "chars": each CJK character is a token (hashing.py); "off": words
    cjk_ngram: int = CJK_NGRAM  # n for documents at least half CJK characters (by token)
    num_perm: int = 128
    bands: int = 0  # 0: chosen for the threshold (with rows)
    rows: int = 0
    verify: bool = True  # check candidate pairs against their signatures
    seed: int = 1


def validate_dedup(cfg: DedupConfig) -> None:
    if not 0 < cfg.threshold < 1:
        raise LoomError(f"dedup.threshold={cfg.threshold} must be between 0 and 1")
    if cfg.ngram < 1 or cfg.num_perm < 2:
        raise LoomError("dedup.ngram must be ≥ 1 and dedup.num_perm ≥ 2")
    if cfg.cjk not in CJK_MODES:
        raise LoomError(f"dedup.cjk={cfg.cjk!r} must be one of {', '.join(CJK_MODES)}")
    if cfg.cjk_ngram < 1:
        raise LoomError(
            f"dedup.cjk_ngram={cfg.cjk_ngram} must be ≥ 1 (the default, {CJK_NGRAM}, is "
            "measured on real Chinese text; see docs/data-prepare.md)"
        )
    if (cfg.bands == 0) != (cfg.rows == 0):
        raise LoomError(
            "set both dedup.bands and dedup.rows, or neither (0 = chosen for the threshold)"
        )
    if cfg.bands * cfg.rows > cfg.num_perm:
        raise LoomError(
            f"dedup.bands × dedup.rows = {cfg.bands * cfg.rows} exceeds "
            f"dedup.num_perm={cfg.num_perm}"
        )


def candidate_probability(similarity: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """Chance that two documents of this Jaccard similarity share at least one band."""
    return 1.0 - (1.0 - similarity**rows) ** bands


def bands_rows(cfg: DedupConfig, recall: float = 0.99) -> tuple[int, int]:
    """The configured layout, or the cheapest one that finds pairs at the threshold.

    Candidates are verified afterwards, so a false positive costs only a comparison while a
    false negative keeps a duplicate: among layouts that make a pair exactly at the threshold
    a candidate with probability ≥ `recall`, take the one with the least false-positive area
    below the threshold (the fewest comparisons); if none reaches it, the most sensitive one.
    """
    if cfg.bands:
        return cfg.bands, cfg.rows
    below = np.linspace(0, cfg.threshold, 201)
    best, best_key = (1, 1), (math.inf, math.inf)
    for bands in range(1, cfg.num_perm + 1):
        for rows in range(1, cfg.num_perm // bands + 1):
            at_threshold = float(candidate_probability(np.array(cfg.threshold), bands, rows))
            probs = candidate_probability(below, bands, rows)
            false_pos = float(((probs[1:] + probs[:-1]) * np.diff(below)).sum() / 2)
            key = (0.0, false_pos) if at_threshold >= recall else (1.0, -at_threshold)
            if key < best_key:
                best, best_key = (bands, rows), key
    return best


def exact_duplicate_of(hashes: np.ndarray) -> np.ndarray:
    """For each document, the index of the first document with the same hash (itself if first)."""
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    return first[inverse]


def band_keys(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """uint64 [documents, bands]: one hash of the `rows` signature values of every band.

    Documents with an empty signature (no words) get key 0 in every band, which the
    candidate search ignores. Column-major, so that a band-sharded search reading one band
    from a saved file (memory-mapped) touches only that band's bytes.
    """
    keys = np.zeros((len(signatures), bands), dtype=np.uint64, order="F")
    for band in range(bands):
        key = np.full(len(signatures), np.uint64(band + 1))
        for column in signatures[:, band * rows : (band + 1) * rows].T:
            key = mix64(key ^ column.astype(np.uint64))
        keys[:, band] = key
    keys[signatures[:, 0] == MAX_HASH32] = 0
    return keys


def near_duplicate_of(
    keys: np.ndarray,
    alive: np.ndarray,
    signature_rows: Callable[[np.ndarray], np.ndarray],
    cfg: DedupConfig,
) -> np.ndarray:
    """For each document, the index of the document kept for its cluster (itself if kept).

    `keys` are band keys of all documents in input order; `alive` marks those that take part
    (filtered documents and exact duplicates do not); `signature_rows(indices)` returns
    signatures for verifying candidate pairs. This is the whole search in one piece; a
    band-sharded run calls `near_pairs` once per shard and `keep_first` on their union.
    """
    index = np.flatnonzero(alive)
    columns = [(keys[index, band], index) for band in range(keys.shape[1])]
    return keep_first(len(keys), near_pairs(columns, signature_rows, cfg))


def near_pairs(
    columns: Iterable[tuple[np.ndarray, np.ndarray]],
    signature_rows: Callable[[np.ndarray], np.ndarray],
    cfg: DedupConfig,
) -> np.ndarray:
    """Unique candidate pairs [k, 2] (i < j, document indices) that pass verification.

    Each column is (band keys, document indices) of one band, or of one key range of a band:
    a bucket of equal keys must be whole within a column. Pairs found in several bands
    are one pair.
    """
    found = [_band_pairs(key, index) for key, index in columns]
    pairs = np.unique(np.concatenate(found), axis=0) if found else np.empty((0, 2), np.int64)
    if cfg.verify and len(pairs):
        agree = (signature_rows(pairs[:, 0]) == signature_rows(pairs[:, 1])).mean(axis=1)
        t = cfg.threshold
        pairs = pairs[agree >= t - 3 * math.sqrt(t * (1 - t) / cfg.num_perm)]
    return pairs


def keep_first(n: int, pairs: np.ndarray) -> np.ndarray:
    """For each of n documents, the first (smallest index) document of its cluster after
    joining the pairs (union-find); repeated pairs are harmless."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])  # path halving
            x = parent[x]
        return x

    for x, y in pairs.tolist():
        rx, ry = find(x), find(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)  # a root is always its cluster's smallest index
    root = np.arange(n)
    for x in parent:
        root[x] = find(x)
    return root


def _band_pairs(key: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Pairs (index[i], index[j]), i < j, with the same non-zero key; `index` ascends."""
    usable = key != 0
    key, index = key[usable], index[usable]
    order = np.argsort(key, kind="stable")
    sorted_keys = key[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
    sizes = np.diff(np.concatenate((starts, [len(order)])))
    found = [np.empty((0, 2), np.int64)]
    for start, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):
        members = index[np.sort(order[start : start + size])]
        if size > _STAR_ABOVE:
            found.append(np.stack([np.full(size - 1, members[0]), members[1:]], axis=1))
        else:
            i, j = np.triu_indices(size, k=1)
            found.append(np.stack([members[i], members[j]], axis=1))
    return np.concatenate(found).astype(np.int64, copy=False)
