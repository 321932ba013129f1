"""Near-duplicate detection on Chinese text: the shingling tokens, and planted near copies of
real Chinese prose (the Debian Reference) found by MinHash LSH and by `loom data prepare`.

True similarities come from tests/corpus.py (Python sets of token n-grams), not from Loom.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from corpus import (
    ChineseCorpus,
    build_chinese,
    change_one_character_per_sentence,
    chinese_documents,
    cjk_jaccard,
    cjk_ngrams,
    common_cjk_characters,
    docstring_documents,
)

from loom.core.errors import LoomError
from loom.data.dedup import (
    DedupConfig,
    band_keys,
    bands_rows,
    candidate_probability,
    near_duplicate_of,
    validate_dedup,
)
from loom.data.hashing import MinHasher, ngram_hashes, shingles, split_tokens, split_words
from loom.data.prepare import load_prepare_config, prepare


@pytest.fixture(scope="module")
def chinese() -> ChineseCorpus:
    return build_chinese()


def keep_of(texts: list[str], cfg: DedupConfig) -> np.ndarray:
    """Loom's near-duplicate search over `texts`: the kept document of each one's cluster."""
    bands, rows = bands_rows(cfg)
    sets = [shingles(t, cfg.ngram, cfg.cjk, cfg.cjk_ngram) for t in texts]
    sig = MinHasher(cfg.num_perm, cfg.seed).signatures(sets)
    return near_duplicate_of(
        band_keys(sig, bands, rows), np.ones(len(texts), bool), lambda i: sig[i], cfg
    )


def loom_jaccard(a: str, b: str) -> float:
    x, y = np.unique(shingles(a, 5)), np.unique(shingles(b, 5))
    return len(np.intersect1d(x, y)) / len(np.union1d(x, y))


def test_tokens_are_cjk_characters_and_the_words_of_the_rest() -> None:
    tokens, is_cjk = split_tokens("Debian 系统，使用 sudo(8)。カナ・한국\U00020000 ＡＢ！end")
    words = [
        "Debian",
        "系",
        "统",
        "使",
        "用",
        "sudo(8)",
        "カ",
        "ナ",
        "・",
        "한",
        "국",
        "\U00020000",
    ]
    words += ["ＡＢ", "end"]  # fullwidth letters are a word; ，。！ separate like spaces
    assert tokens.tolist() == [int(split_words(w).hashes[0]) for w in words]
    assert is_cjk.tolist() == [False, *[True] * 4, False, *[True] * 6, False, False]
    assert len(split_tokens("。、\u3000 ")[0]) == 0


@pytest.mark.slow
def test_english_shingles_are_unchanged() -> None:
    for _, text in docstring_documents():
        words = split_words(text.lower()).hashes  # the word 5-grams of before CJK tokens
        assert np.array_equal(shingles(text, 5), ngram_hashes(words, 5))
    chinese_text = chinese_documents()[0][1]
    words = split_words(chinese_text.lower()).hashes
    assert np.array_equal(shingles(chinese_text, 5, cjk="off"), ngram_hashes(words, 5))


def test_shingle_sets_agree_with_python_sets_of_ngrams(chinese: ChineseCorpus) -> None:
    """Loom's hashed shingles and corpus.py's tuples are the same sets: equal sizes for every
    section, equal Jaccard for every planted pair."""
    for text in chinese.originals.values():
        assert len(np.unique(shingles(text, 5))) == len(cjk_ngrams(text))
        # dedup.cjk_ngram sets the n of a mostly-CJK document
        assert len(np.unique(shingles(text, 5, cjk_n=3))) == len(cjk_ngrams(text, 3))
    texts = {r["id"]: r["text"] for r in chinese.records}
    for copy_id, (original, _, similarity) in chinese.copies.items():
        assert loom_jaccard(texts[original], texts[copy_id]) == pytest.approx(similarity)


def test_planted_chinese_near_copies_found_and_no_document_wrongly_dropped(
    chinese: ChineseCorpus,
) -> None:
    ids = [r["id"] for r in chinese.records]
    index = {doc: i for i, doc in enumerate(ids)}
    kept = keep_of([r["text"] for r in chinese.records], DedupConfig())
    similar = [(index[c], index[o]) for c, (o, _, j) in chinese.copies.items() if j >= 0.8]
    assert len(similar) >= 500  # enough pairs that 99 % means something
    found = sum(kept[c] == kept[o] for c, o in similar)
    assert found >= 0.99 * len(similar)
    for i, k in enumerate(kept):  # precision: dropped only for a copy of the same original
        assert chinese.group_of(ids[k]) == chinese.group_of(ids[i])


def test_word_shingles_miss_them(chinese: ChineseCorpus) -> None:
    """Why CJK tokens: with whitespace words a Chinese clause is one word, and one changed
    character per sentence hides most copies."""
    ids = [r["id"] for r in chinese.records]
    index = {doc: i for i, doc in enumerate(ids)}
    kept = keep_of([r["text"] for r in chinese.records], DedupConfig(cjk="off"))
    changed = [
        (index[c], index[o]) for c, (o, kind, _) in chinese.copies.items() if kind == "changed"
    ]
    assert sum(kept[c] == kept[o] for c, o in changed) < 0.5 * len(changed)


def test_mixed_chinese_and_english_documents() -> None:
    """Chinese sections with English paragraphs mixed in (mostly Chinese: character 2-grams)
    and English documents with a Chinese paragraph (mostly English: word 5-grams)."""
    rng = random.Random(1)
    zh = [t for _, t in chinese_documents()[:40]]
    en = [t for _, t in docstring_documents()[:40]]
    alphabet = common_cjk_characters(zh)
    originals = []
    for k, (z, e) in enumerate(zip(zh, en, strict=True)):
        english = e.split("\n\n")
        if k % 2:  # an English document with a Chinese paragraph
            chinese_paragraph = z.split("\n\n")[0]
            originals.append("\n\n".join([*english, chinese_paragraph]))
        else:
            originals.append("\n\n".join([*z.split("\n\n"), *english[:2]]))
    copies = [change_one_character_per_sentence(t, rng, alphabet) for t in originals]
    similarity = [cjk_jaccard(a, b) for a, b in zip(originals, copies, strict=True)]
    for a, b, j in zip(originals, copies, similarity, strict=True):
        assert loom_jaccard(a, b) == pytest.approx(j)
    kept = keep_of(originals + copies, DedupConfig())
    n = len(originals)
    assert (kept[:n] == np.arange(n)).all()  # no original merged with another
    similar = [k for k in range(n) if similarity[k] >= 0.8]
    assert len(similar) >= 35 and all(kept[n + k] == k for k in similar)
    assert all(kept[n + k] in (k, n + k) for k in range(n))


def test_lsh_layout_finds_99_percent_of_pairs_at_the_threshold(chinese: ChineseCorpus) -> None:
    """The default bands × rows make a pair at Jaccard 0.8 a candidate with probability ≥ 0.99,
    and the planted pairs just above it are candidates that often, over many hash seeds."""
    cfg = DedupConfig()
    bands, rows = bands_rows(cfg)
    assert candidate_probability(np.array(cfg.threshold), bands, rows) >= 0.99
    texts = {r["id"]: r["text"] for r in chinese.records}
    near_threshold = [(c, o) for c, (o, _, j) in chinese.copies.items() if 0.8 <= j < 0.84]
    assert len(near_threshold) >= 20
    sets = [(shingles(texts[c], 5), shingles(texts[o], 5)) for c, o in near_threshold]
    trials = found = 0
    for seed in range(40):
        sig = MinHasher(cfg.num_perm, seed).signatures([s for pair in sets for s in pair])
        keys = band_keys(sig, bands, rows)
        found += int((keys[0::2] == keys[1::2]).any(axis=1).sum())
        trials += len(sets)
    assert found >= 0.985 * trials  # the binomial spread of 0.99 over ≥ 800 trials


def test_cjk_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(LoomError, match="dedup.cjk_ngram=0 must be ≥ 1"):
        validate_dedup(DedupConfig(cjk_ngram=0))
    with pytest.raises(LoomError, match="dedup.cjk=.*must be one of chars, off"):
        validate_dedup(DedupConfig(cjk="kanji"))  # type: ignore[arg-type]
    path = tmp_path / "prepare.toml"
    path.write_text('[[sources]]\nname = "zh"\npaths = ["*.jsonl"]\n')
    with pytest.raises(LoomError, match="dedup.cjk must be one of chars, off"):
        load_prepare_config(path, ["--dedup.cjk=words"])


def test_prepare_removes_the_chinese_near_copies(chinese: ChineseCorpus, tmp_path: Path) -> None:
    raw = chinese.write_jsonl(tmp_path / "raw")
    config = tmp_path / "prepare.toml"
    config.write_text(
        f"""
[[sources]]
name = "zh"
paths = ["{raw}/*.jsonl"]

[filters]
enabled = false

[tokenizer]
vocab_size = 600

[output]
dir = "{tmp_path}/out"
val_fraction = 0.0

[executor]
workers = 1
""",
        encoding="utf-8",
    )
    manifest = prepare(load_prepare_config(config, []))
    out = tmp_path / "out"
    kept = {
        json.loads(line)["id"]
        for f in (out / "documents").glob("*.jsonl")
        for line in f.read_text(encoding="utf-8").splitlines()
    }
    dropped = [
        json.loads(line)
        for f in (out / "dropped").glob("*.jsonl")
        for line in f.read_text(encoding="utf-8").splitlines()
    ]
    similar = [(c, o) for c, (o, _, j) in chinese.copies.items() if j >= 0.8]
    assert sum(not (c in kept and o in kept) for c, o in similar) >= 0.99 * len(similar)
    for record in dropped:
        assert record["reason"] in ("exact_duplicate", "near_duplicate")
        # Also an exact copy of a document that near dedup dropped points at a kept one.
        partner = record["duplicate_of"]
        assert partner in kept
        assert chinese.group_of(partner) == chinese.group_of(record["id"])
    assert len(kept) + len(dropped) == len(chinese.records)
    texts = {r["id"]: r["text"] for r in chinese.records}
    identical = sum(texts[c] == texts[o] for c, (o, _, _) in chinese.copies.items())
    assert manifest["stages"]["exact_dedup"]["dropped"]["exact_duplicate"] == identical
