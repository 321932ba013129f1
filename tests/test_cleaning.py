"""Normalisation, quality filters, PII redaction, hashing and MinHash/LSH, one piece at a time."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from corpus import docstring_documents, jaccard

from loom.core.errors import LoomError
from loom.data.dedup import (
    DedupConfig,
    band_keys,
    bands_rows,
    candidate_probability,
    near_duplicate_of,
)
from loom.data.filters import FilterConfig, QualityFilter, filter_names, validate_filters
from loom.data.hashing import MinHasher, shingles, split_words
from loom.data.normalize import NormalizeConfig, normalize
from loom.data.pii import PiiConfig, redact

PROSE = docstring_documents()[3][1]  # real English prose that passes the default filters
VOCABULARY = sorted(
    {w.strip(".,:;()'\"`").lower() for _, t in docstring_documents() for w in t.split()} - {""}
)


def distinct_words(n: int, *, alpha: bool = True, seed: int = 0) -> list[str]:
    """n different real words (so no repetition rule fires), optionally letters-only."""
    pool = [w for w in VOCABULARY if 3 <= len(w) <= 8 and (w.isalpha() or not alpha)]
    return random.Random(seed).sample(pool, n)


def lines_of(words: list[str], per_line: int, end: str = "") -> str:
    return "\n".join(
        " ".join(words[i : i + per_line]) + end for i in range(0, len(words), per_line)
    )


def test_normalize_keeps_indentation_and_cleans_the_rest() -> None:
    text = "  def f():\r\n\tx  =  1\x07   \r\n\n\n\n  cafe\u0301\u200b said\t\thi  "
    out = normalize(text, NormalizeConfig())
    assert out == "  def f():\n\tx = 1\n\n  café said hi"
    assert normalize("cafÃ© naÃ¯ve", NormalizeConfig(fix_mojibake=True)) == "café naïve"
    assert normalize("a  b", NormalizeConfig(collapse_whitespace=False)) == "a  b"


def test_real_prose_passes_the_default_filters() -> None:
    assert QualityFilter(FilterConfig()).check(PROSE) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("too short to be a document", "min_words"),
        (
            " ".join([f"internationalization{w}" for w in distinct_words(80)] + ["the", "and"]),
            "mean_word_length",
        ),
        (
            " ".join(distinct_words(60) + [str(10_000 + i) for i in range(40)] + ["the", "and"]),
            "alpha_words",
        ),
        (PROSE + " #tag" * 200, "symbol_word_ratio"),
        (
            "\n".join(f"- item {i} of the list and more words here" for i in range(60)),
            "bullet_lines",
        ),
        (lines_of([*distinct_words(600), "the", "and"], 15, "..."), "ellipsis_lines"),
        ("\n".join(["the same line of text with the and of"] * 40), "duplicate_lines"),
        (" ".join(["the quick brown fox jumps over the lazy dog"] * 30), "top_2gram_chars"),
        (" ".join(w for w in (PROSE.split() * 2)), "duplicate_5gram_chars"),
        (
            " ".join(
                w
                for w in distinct_words(200)
                if w not in {"the", "be", "to", "of", "and", "that", "have", "with"}
            ),
            "stop_words",
        ),
    ],
)
def test_each_filter_drops_what_it_names(text: str, reason: str) -> None:
    cfg = FilterConfig()
    if reason == "duplicate_5gram_chars":
        cfg.disable = [
            "duplicate_lines",
            "duplicate_line_chars",
            "duplicate_paragraphs",
            "duplicate_paragraph_chars",
            "top_2gram_chars",
            "top_3gram_chars",
            "top_4gram_chars",
        ]
    assert QualityFilter(cfg).check(text) == reason
    cfg.disable = [*cfg.disable, reason]
    assert QualityFilter(cfg).check(text) != reason  # disabling it really turns it off


def test_bad_words_custom_callable_and_thresholds(tmp_path: Path) -> None:
    assert (
        QualityFilter(FilterConfig(bad_words=["spamword"])).check(PROSE + " spamword")
        == "bad_words"
    )
    assert (
        QualityFilter(FilterConfig(bad_words=["spamword"], max_bad_words=1)).check(
            PROSE + " spamword"
        )
        is None
    )
    (tmp_path / "words.txt").write_text("forbidden\n")
    assert (
        QualityFilter(FilterConfig(bad_words_file=str(tmp_path / "words.txt"))).check(
            PROSE + " FORBIDDEN"
        )
        == "bad_words"
    )
    (tmp_path / "rule.py").write_text(
        "def check(text):\n    return 'has-x' if 'xylophone' in text else True\n"
    )
    rule = FilterConfig(custom=f"{tmp_path}/rule.py:check")
    assert QualityFilter(rule).check(PROSE + " xylophone") == "custom:has-x"
    assert QualityFilter(rule).check(PROSE) is None
    assert QualityFilter(FilterConfig(min_words=100_000)).check(PROSE) == "min_words"
    assert QualityFilter(FilterConfig(enabled=False)).check("x") is None


def test_filter_config_errors(tmp_path: Path) -> None:
    with pytest.raises(LoomError, match="unknown filter"):
        validate_filters(FilterConfig(disable=["nope"]))
    with pytest.raises(LoomError, match="no built-in stop words"):
        validate_filters(FilterConfig(language="xx"))
    with pytest.raises(LoomError, match="could not be loaded"):
        validate_filters(FilterConfig(custom=f"{tmp_path}/missing.py:f"))
    assert "duplicate_10gram_chars" in filter_names(FilterConfig())


def test_pii_redaction() -> None:
    counts: Counter[str] = Counter()
    text = (
        "Write to jane.doe+news@example.org, call +44 20 7946 0958 or (030) 1234 5678, "
        "server 10.0.0.12 and fe80:0000:0000:0000:0202:b3ff:fe1e:8329. "
        "Python 3.11.7 in 2024, id 12345678."
    )
    out = redact(text, PiiConfig(enabled=True), counts)
    assert (
        "jane.doe" not in out and "7946" not in out and "10.0.0.12" not in out and "fe80" not in out
    )
    assert counts == {"email": 1, "phone": 2, "ip_address": 2}
    assert "3.11.7" in out and "2024" in out and "12345678" in out  # versions, years, ids stay
    assert redact(text, PiiConfig(enabled=False), Counter()) == text


def test_word_hashes_are_positional_free_and_count_characters() -> None:
    words = split_words("héllo world héllo\tworld\nx")
    assert words.hashes[0] == words.hashes[2] and words.hashes[1] == words.hashes[3]
    assert words.char_lengths.tolist() == [5, 5, 5, 5, 1]
    assert len(split_words("   ")) == 0


def test_minhash_estimates_jaccard() -> None:
    docs = [t for _, t in docstring_documents()[:40]]
    rng = random.Random(0)
    hasher = MinHasher(256, seed=3)
    errors = []
    for text in docs:
        words = text.split()
        for i in rng.sample(range(len(words)), len(words) // 20):
            words[i] = "changed"
        other = " ".join(words)
        sig = hasher.signatures([shingles(text, 5), shingles(other, 5)])
        errors.append(abs((sig[0] == sig[1]).mean() - jaccard(text, other)))
    assert (
        np.mean(errors) < 0.03 and max(errors) < 0.12
    )  # standard error ≈ 0.03 at 256 permutations


def test_default_lsh_layout_finds_pairs_at_the_threshold() -> None:
    for threshold in (0.7, 0.8, 0.9):
        bands, rows = bands_rows(DedupConfig(threshold=threshold))
        assert bands * rows <= 128
        assert candidate_probability(np.array(threshold), bands, rows) >= 0.99
        assert candidate_probability(np.array(threshold - 0.5), bands, rows) < 0.05


def test_near_duplicates_cluster_and_keep_the_first() -> None:
    docs = [t for _, t in docstring_documents()[:30]]
    near = docs[5] + "\n\nAppended sentence about nothing in particular."
    texts = [*docs, near, docs[7][: len(docs[7]) // 2]]  # a near copy, and a half (J < 0.8)
    cfg = DedupConfig()
    bands, rows = bands_rows(cfg)
    sig = MinHasher(cfg.num_perm, cfg.seed).signatures([shingles(t, cfg.ngram) for t in texts])
    keep_of = near_duplicate_of(
        band_keys(sig, bands, rows), np.ones(len(texts), bool), lambda i: sig[i], cfg
    )
    assert keep_of[30] == 5  # the copy points at the earlier original
    assert keep_of[31] == 31  # half a document is not a near duplicate
    assert (keep_of[:30] == np.arange(30)).all()
    alive = np.ones(len(texts), bool)
    alive[5] = False  # the original is gone (filtered): the copy is now kept
    assert near_duplicate_of(band_keys(sig, bands, rows), alive, lambda i: sig[i], cfg)[30] == 30
