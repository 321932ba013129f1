"""Vectorised text hashing: words, word n-grams and MinHash signatures, all in numpy.

Words are maximal runs of non-whitespace bytes of the UTF-8 text. A word's hash is a
polynomial hash of its bytes computed for every word at once from one prefix sum
(uint64 arithmetic wraps, i.e. works modulo 2^64), then mixed with the splitmix64 finaliser.
n-gram hashes combine n consecutive word hashes the same way. MinHash permutes the top 32
bits of each shingle hash with h(x) = (a·x + b) mod 2^32, a odd (a bijection of the 32-bit
values), for all shingles and permutations of a batch in one uint32 broadcast, reduced per
document; uint32 halves the memory traffic of this, the dominant step.

CJK text has no spaces between words, so for shingling (`split_tokens`) every CJK character
(Han, kana, hangul, bopomofo; see `_CJK_RANGES`) is a token of its own and CJK punctuation
(U+3000-303F, the fullwidth and vertical punctuation forms) separates tokens like
whitespace: it carries no content, and a changed comma should not count as a changed word.
Other text stays whitespace words, so a mixed-script document is Chinese characters and
English words in one token sequence. Code points are read from the UTF-8 lead bytes (1110xxxx
starts a 3-byte character, 11110xxx a 4-byte one), for all characters at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

_BASE = np.uint64(0x100000001B3)  # odd, so it has an inverse modulo 2^64
_BASE_INV = np.uint64(pow(int(_BASE), -1, 2**64))
_NGRAM_BASE = np.uint64(0x9E3779B97F4A7C15)
_WHITESPACE = np.zeros(256, dtype=bool)
_WHITESPACE[[9, 10, 11, 12, 13, 32]] = True
MAX_HASH32 = np.uint32(0xFFFFFFFF)

CjkMode = Literal["chars", "off"]
CJK_MODES: tuple[CjkMode, ...] = ("chars", "off")
# One changed character per sentence of real Chinese prose (Debian Reference, 175 sections)
# keeps 99% of copies at Jaccard ≥ 0.8 with character 2-grams, 86% with 3-grams, 66% with
# 4-grams; unrelated sections of that one-topic book reach at most 0.12 with 2-grams.
CJK_NGRAM = 2
_OTHER, _CJK, _CJK_PUNCT = 0, 1, 2
# Inclusive code point ranges of the characters that are tokens on their own.
_CJK_RANGES = (
    (0x1100, 0x11FF),  # Hangul Jamo
    (0x2E80, 0x2FDF),  # CJK and Kangxi radicals
    (0x3040, 0x33FF),  # kana, bopomofo, Hangul compatibility jamo, enclosed and compatibility
    (0x3400, 0x4DBF),  # CJK Unified Ideographs Extension A
    (0x4E00, 0x9FFF),  # CJK Unified Ideographs
    (0xA960, 0xA97F),  # Hangul Jamo Extended-A
    (0xAC00, 0xD7FF),  # Hangul syllables, Hangul Jamo Extended-B
    (0xF900, 0xFAFF),  # CJK Compatibility Ideographs
    (0xFF66, 0xFFDC),  # halfwidth katakana and hangul
)
_CJK_PUNCT_RANGES = (
    (0x3000, 0x303F),  # CJK symbols and punctuation: ideographic space, 、。「」〈〉
    (0xFE10, 0xFE1F),  # vertical forms
    (0xFE30, 0xFE6F),  # CJK compatibility forms, small form variants
    (0xFF01, 0xFF0F),  # fullwidth ！＂＃ … ／ (fullwidth digits and letters stay word bytes)
    (0xFF1A, 0xFF20),
    (0xFF3B, 0xFF40),
    (0xFF5B, 0xFF65),
)
_SUPPLEMENTARY_CJK = ((0x1B000, 0x1B16F), (0x20000, 0x3FFFF))  # kana supplement, Han B-H


def _bmp_classes() -> np.ndarray:
    classes = np.full(0x10000, _OTHER, dtype=np.uint8)
    for ranges, kind in ((_CJK_RANGES, _CJK), (_CJK_PUNCT_RANGES, _CJK_PUNCT)):
        for first, last in ranges:
            classes[first : last + 1] = kind
    return classes


_BMP_CLASS = _bmp_classes()


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


_POWERS_CACHED = 1 << 20  # bytes of text; 16 MiB of tables
_POWERS = (_powers(_BASE, 1 << 14), _powers(_BASE_INV, 1 << 14))


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Powers of the base and of its inverse, at least n of each: kept between calls up to
    `_POWERS_CACHED`, because computing them per document was a third of hashing's time."""
    global _POWERS
    if n <= len(_POWERS[0]):
        return _POWERS
    if n > _POWERS_CACHED:
        return _powers(_BASE, n), _powers(_BASE_INV, n)
    size = min(max(n, 2 * len(_POWERS[0])), _POWERS_CACHED)
    _POWERS = (_powers(_BASE, size), _powers(_BASE_INV, size))
    return _POWERS


def _range_hashes(data: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Polynomial hash of each byte range data[start : end + 1], all from one prefix sum."""
    n = data.size
    powers, inverse_powers = _power_tables(n)
    prefix = np.cumsum(data.astype(np.uint64) * inverse_powers[:n], dtype=np.uint64)
    before = np.where(starts > 0, prefix[np.maximum(starts - 1, 0)], np.uint64(0))
    return mix64((prefix[ends] - before) * powers[ends])


def split_words(text: str) -> Words:
    """Hash every whitespace-separated word of `text` (case-sensitive; lower-case it first)."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    if data.size == 0:
        return Words(np.empty(0, np.uint64), np.empty(0, np.int64))
    is_word = ~_WHITESPACE[data]
    edges = np.diff(np.concatenate(([False], is_word, [False])).astype(np.int8))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1) - 1  # inclusive
    if starts.size == 0:
        return Words(np.empty(0, np.uint64), np.empty(0, np.int64))
    hashes = _range_hashes(data, starts, ends)
    # UTF-8 continuation bytes are 10xxxxxx; every other byte starts a character.
    lead = np.cumsum((data & 0xC0) != 0x80, dtype=np.int64)
    char_lengths = lead[ends] - np.where(starts > 0, lead[np.maximum(starts - 1, 0)], 0)
    return Words(hashes, char_lengths)


def split_tokens(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of the shingling tokens of `text` (CJK characters, and whitespace words of the
    rest; see the module docstring) and a bool mask of the tokens that are CJK characters.

    A word hashes as in `split_words`, so text without CJK gives exactly its word hashes.
    """
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    top = int(data.max()) if data.size else 0
    if top < 0xE1:  # no character at or above U+1100
        words = split_words(text).hashes
        return words, np.zeros(len(words), dtype=bool)
    n = data.size
    # kind of every byte of each character, with a separator before and after the text
    kind = np.full(n + 2, _CJK_PUNCT, dtype=np.uint8)
    kind[1:-1] = _OTHER
    at3 = np.flatnonzero((data & 0xF0) == 0xE0)  # str.encode never truncates a character
    cp3 = (
        ((data[at3].astype(np.int32) & 0x0F) << 12)
        | ((data[at3 + 1].astype(np.int32) & 0x3F) << 6)
        | (data[at3 + 2] & 0x3F)
    )
    for k in range(1, 4):
        kind[at3 + k] = _BMP_CLASS[cp3]
    if top >= 0xF0:
        at4 = np.flatnonzero((data & 0xF8) == 0xF0)
        cp4 = (
            ((data[at4].astype(np.int32) & 0x07) << 18)
            | ((data[at4 + 1].astype(np.int32) & 0x3F) << 12)
            | ((data[at4 + 2].astype(np.int32) & 0x3F) << 6)
            | (data[at4 + 3] & 0x3F)
        )
        at4 = at4[
            np.logical_or.reduce([(cp4 >= lo) & (cp4 <= hi) for lo, hi in _SUPPLEMENTARY_CJK])
        ]
        for k in range(1, 5):
            kind[at4 + k] = _CJK
    separator = kind == _CJK_PUNCT
    separator[1:-1] |= _WHITESPACE[data]
    cjk = kind == _CJK
    lead = np.ones(n + 2, dtype=bool)
    lead[1:-1] = (data & 0xC0) != 0x80
    # A token starts after a separator, and at a character boundary next to a CJK character;
    # it ends before a separator, and at such a boundary.
    inside = ~separator[1:-1]
    boundary_before = lead[1:-1] & (cjk[1:-1] | cjk[:-2])
    boundary_after = lead[2:] & (cjk[1:-1] | cjk[2:])
    starts = np.flatnonzero(inside & (separator[:-2] | boundary_before))
    ends = np.flatnonzero(inside & (separator[2:] | boundary_after))
    if starts.size == 0:
        return np.empty(0, np.uint64), np.empty(0, dtype=bool)
    return _range_hashes(data, starts, ends), cjk[starts + 1]


def ngram_hashes(word_hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of each run of n consecutive words (empty when there are fewer than n words)."""
    count = len(word_hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    acc = np.zeros(count, dtype=np.uint64)
    for k in range(n):
        acc = acc * _NGRAM_BASE + word_hashes[k : k + count]
    return mix64(acc)


def shingles(text: str, n: int, cjk: CjkMode = "chars", cjk_n: int = CJK_NGRAM) -> np.ndarray:
    """Token n-gram hashes of the lower-cased text, repeats included (a minimum does not care);
    a document shorter than n tokens is one shingle of all its tokens, so short texts compare.

    Tokens are whitespace words (cjk="off"), or with cjk="chars" CJK characters and the words
    of the rest (`split_tokens`). A document of which at least half the tokens are CJK
    characters uses `cjk_n`-grams instead of n-grams: one character says less than one word,
    so n characters would make a copy with one changed character per sentence look new.
    """
    text = text.lower()
    if cjk == "off":
        tokens = split_words(text).hashes
    else:
        tokens, is_cjk = split_tokens(text)
        if 2 * int(is_cjk.sum()) >= len(tokens):
            n = cjk_n
    return ngram_hashes(tokens, min(n, len(tokens))) if len(tokens) else tokens


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
