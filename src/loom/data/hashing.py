"""Vectorised text hashing: words, word n-grams and MinHash signatures, all in numpy.

Words are maximal runs of non-whitespace bytes of the UTF-8 text. A word's hash is a
polynomial hash of its bytes computed for every word at once from one prefix sum
(uint64 arithmetic wraps, i.e. works modulo 2^64), then mixed with the splitmix64 finaliser.
n-gram hashes combine n consecutive word hashes the same way. MinHash permutes the top 32
bits of each shingle hash with h(x) = (a·x + b) mod 2^32, a odd (a bijection of the 32-bit
values), for all shingles and permutations of a batch in one uint32 broadcast, reduced per
document; uint32 halves the memory traffic of this, the dominant step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_BASE = np.uint64(0x100000001B3)  # odd, so it has an inverse modulo 2^64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 2**64))
_NGRAM_BASE = np.uint64(0x9E3779B97F4A7C15)
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
MAX_HASH32 = np.uint32(0xFFFFFFFF)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the whole output word."""
    x = np.atleast_1d(x).astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):  # wrapping modulo 2^64 is the point
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


@dataclass
class Words:
    """The words of one text: their hashes and their lengths in characters."""

    hashes: np.ndarray  # uint64 [n_words]
    char_lengths: np.ndarray  # int64 [n_words]

    def __len__(self) -> int:
        return len(self.hashes)


def _powers(base: np.uint64, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint64)
    if n:
        out[0] = 1
        out[1:] = base
        np.cumprod(out, out=out)
    return out


def split_words(text: str) -> Words:
    """Hash every whitespace-separated word of `text` (case-sensitive; lower-case it first)."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if data.size == 0:
        return Words(np.empty(0, np.uint64), np.empty(0, np.int64))
    space = _WHITESPACE[data]
    is_word = ~space
    edges = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1  # inclusive
    if starts.size == 0:
        return Words(np.empty(0, np.uint64), np.empty(0, np.int64))
    n = data.size
    weighted = data.astype(np.uint64) * _powers(_BASE_INV, n)
    prefix = np.cumsum(weighted, dtype=np.uint64)
    before = np.where(starts > 0, prefix[np.maximum(starts - 1, 0)], np.uint64(0))
    hashes = mix64((prefix[ends] - before) * _powers(_BASE, n)[ends])
    # UTF-8 continuation bytes are 10xxxxxx; every other byte starts a character.
    lead = np.cumsum((data & 0xC0) != 0x80, dtype=np.int64)
    char_lengths = lead[ends] - np.where(starts > 0, lead[np.maximum(starts - 1, 0)], 0)
    return Words(hashes, char_lengths)


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of each run of n consecutive words (empty when there are fewer than n words)."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        acc = acc * _NGRAM_BASE + word_hashes[k : k + count]
    return mix64(acc)


def shingles(text: str, n: int) -> np.ndarray:
    """Word n-gram hashes of the lower-cased text, repeats included (a minimum does not care);
    a document shorter than n words is one shingle of all its words, so short texts compare."""
    words = split_words(text.lower()).hashes
    return ngram_hashes(words, min(n, len(words))) if len(words) else words


class MinHasher:
    """MinHash signatures with `num_perm` permutations of 32-bit shingle values, from a seed."""

    def __init__(self, num_perm: int, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.num_perm = num_perm
        self.a = (rng.integers(0, 2**31, size=num_perm, dtype=np.uint32) * 2 + 1).astype(np.uint32)
        self.b = rng.integers(0, 2**32, size=num_perm, dtype=np.uint64).astype(np.uint32)

    def signatures(self, shingle_sets: Sequence[np.ndarray], chunk: int = 1 << 13) -> np.ndarray:
        """uint32 [len(shingle_sets), num_perm]; an empty set gets the all-ones signature."""
        out = np.full((len(shingle_sets), self.num_perm), MAX_HASH32, dtype=np.uint32)
        batch: list[int] = []
        size = 0
        for i, s in enumerate(shingle_sets):
            if len(s) == 0:
                continue
            batch.append(i)
            size += len(s)
            if size >= chunk:  # a few MB of work: stays in cache
                self._fill(out, batch, shingle_sets)
                batch, size = [], 0
        if batch:
            self._fill(out, batch, shingle_sets)
        return out

    def _fill(self, out: np.ndarray, rows: list[int], sets: Sequence[np.ndarray]) -> None:
        values = (np.concatenate([sets[i] for i in rows]) >> np.uint64(32)).astype(np.uint32)
        lengths = np.array([len(sets[i]) for i in rows])
        offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        permuted = values[:, None] * self.a[None, :] + self.b[None, :]  # wraps modulo 2^32
        out[rows] = np.minimum.reduceat(permuted, offsets, axis=0)
