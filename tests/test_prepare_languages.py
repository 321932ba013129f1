"""`loom data prepare` on a mixed Chinese + English corpus of real text: every document's
detected language in `documents/` and `dropped/`, `filters.languages` selecting languages,
`[filters.<lang>]` tables applied by language, per-language funnels and bytes per token in the
manifest and the report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import corpus as corpus_module
import numpy as np
import pytest

from loom.core.tokenizer import load_tokenizer
from loom.data.language import LanguageDetector
from loom.data.normalize import NormalizeConfig, normalize
from loom.data.prepare import load_prepare_config, prepare
from loom.report import write_report

FUNNEL = ("language", "filter", "pii", "exact_dedup", "near_dedup")
GERMAN = [  # a third language, which `filters.languages = ["zh", "en"]` drops
    "Die Bibliothek der Stadt bleibt im Sommer an den Wochenenden geschlossen, weil die "
    "Mitarbeiter das alte Gebäude renovieren und die Bücher in neue Regale einsortieren.",
    "Wer mit dem Zug von Hamburg nach München fährt, sollte einen Sitzplatz reservieren, denn "
    "an Feiertagen sind die Wagen oft überfüllt und die Fahrt dauert fast sechs Stunden.",
    "Unser Nachbar hat im Garten einen kleinen Teich angelegt, in dem jetzt Frösche leben, und "
    "die Kinder aus der Straße kommen jeden Abend, um ihnen beim Quaken zuzuhören.",
]


@pytest.fixture(scope="module")
def mixed_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real Chinese sections (Debian Reference) and real English docstrings, one JSONL each, plus
    exact copies of a few Chinese sections (dedup must count them under zh)."""
    raw = tmp_path_factory.mktemp("mixed")
    zh = corpus_module.chinese_documents()[:60]
    en = corpus_module.docstring_documents()[:60]
    with (raw / "zh.jsonl").open("w", encoding="utf-8") as fh:
        for name, text in zh + zh[:5]:
            fh.write(json.dumps({"text": text, "name": name}, ensure_ascii=False) + "\n")
    with (raw / "en.jsonl").open("w", encoding="utf-8") as fh:
        for name, text in en:
            fh.write(json.dumps({"text": text, "name": name}) + "\n")
    with (raw / "de.jsonl").open("w", encoding="utf-8") as fh:
        for text in GERMAN:
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return raw


def run(tmp: Path, raw: Path, extra: str = "") -> tuple[dict, Path]:
    path = tmp / "prepare.toml"
    path.write_text(
        f"""
[[sources]]
name = "zh"
paths = ["{raw}/zh.jsonl"]

[[sources]]
name = "en"
paths = ["{raw}/en.jsonl"]

[[sources]]
name = "de"
paths = ["{raw}/de.jsonl"]

[tokenizer]
vocab_size = 2000

[output]
dir = "{tmp}/out"
val_fraction = 0.1

[executor]
workers = 1
{extra}
""",
        encoding="utf-8",
    )
    return prepare(load_prepare_config(path, [])), tmp / "out"


def read_jsonl(folder: Path) -> list[dict]:
    return [
        json.loads(line)
        for file in sorted(folder.glob("*.jsonl"))
        for line in file.read_text(encoding="utf-8").splitlines()
    ]


@pytest.mark.slow
def test_mixed_corpus_funnels_languages_and_bytes_per_token(mixed_raw: Path, tmp_path: Path):
    manifest, out = run(tmp_path, mixed_raw, '[filters]\nlanguages = ["zh", "en"]')
    kept = read_jsonl(out / "documents")
    dropped = read_jsonl(out / "dropped")
    # Every kept and dropped document carries its language; sources are one language each.
    by_source = {s: {d["language"] for d in kept if d["source"] == s} for s in ("zh", "en", "de")}
    assert by_source == {"zh": {"zh"}, "en": {"en"}, "de": set()}
    assert all("language" in d for d in dropped)
    wrong = [d for d in dropped if d["reason"] == "wrong_language"]
    assert len(wrong) == len(GERMAN) and {(d["source"], d["language"]) for d in wrong} == {
        ("de", "de")
    }
    assert manifest["stages"]["language"]["dropped"] == {"wrong_language": len(GERMAN)}
    # The five planted copies of Chinese documents: exact duplicates of their kept originals, or
    # dropped by the filter that dropped the original.
    reason_of = {d["id"]: d["reason"] for d in dropped}
    kept_ids = {d["id"] for d in kept}
    for copy in range(61, 66):  # ids count records from 1
        original, duplicate = f"zh:zh.jsonl:{copy - 60}", f"zh:zh.jsonl:{copy}"
        expected = "exact_duplicate" if original in kept_ids else reason_of[original]
        assert reason_of[duplicate] == expected
    exact = [d for d in dropped if d["reason"] == "exact_duplicate"]
    assert exact and {d["language"] for d in exact} == {"zh"}

    languages = manifest["languages"]
    assert set(languages) == {"zh", "en", "de"}
    assert languages["de"]["dropped"] == {"wrong_language": len(GERMAN)}
    stages = manifest["stages"]
    for lang, summary in languages.items():
        funnel = [stages[st]["per_language"][lang] for st in FUNNEL]
        # Each stage's input is the previous stage's output, and the funnel ends at the kept docs.
        for before, after in itertools.pairwise(funnel):
            assert after["documents_in"] == before["documents_out"]
        assert funnel[0]["documents_in"] == summary["documents"]
        assert funnel[-1]["documents_out"] == summary["kept_documents"]
        assert summary["kept_documents"] == sum(1 for d in kept if d["language"] == lang)
        # Bytes per token, recomputed from the kept documents with the trained tokenizer.
        texts = [d["text"] for d in kept if d["language"] == lang]
        tokenizer = load_tokenizer(out / "tokenizer")
        tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False))
        size = sum(len(t.encode("utf-8")) for t in texts)
        assert summary["tokens"] == tokens
        if lang == "de":  # nothing kept
            assert tokens == 0 and summary["bytes_per_token"] is None
        else:
            assert summary["bytes_per_token"] == pytest.approx(size / tokens, rel=1e-3)
    # The per-source funnel gained the language stage, and per-language counts add up to it.
    for st in FUNNEL:
        assert sum(v["documents_out"] for v in stages[st]["per_source"].values()) == sum(
            v["documents_out"] for v in stages[st]["per_language"].values()
        )
    # Chinese survives the filters (segmented words, Chinese stop words) instead of being
    # dropped wholesale by whitespace word counts.
    assert languages["zh"]["kept_documents"] >= 0.8 * 60

    html = write_report(out).read_text(encoding="utf-8")
    assert "documents per detected language after each stage" in html
    assert f"{languages['zh']['bytes_per_token']:.2f}" in html


@pytest.mark.slow
def test_per_language_tables_apply_by_language(mixed_raw: Path, tmp_path: Path) -> None:
    # English documents must have at least 10^6 words: every one goes as min_words. Chinese ones
    # detected with a probability under the median of the Chinese sections go as
    # language_score, the others keep Loom's Chinese defaults.
    detector = LanguageDetector()
    records = [json.loads(line) for line in (mixed_raw / "zh.jsonl").read_text().splitlines()]
    scores = {
        f"zh:zh.jsonl:{i}": detector.detect(normalize(r["text"], NormalizeConfig()))[1]
        for i, r in enumerate(records, 1)
    }
    cutoff = float(np.median(list(scores.values())))
    manifest, out = run(
        tmp_path,
        mixed_raw,
        '[filters]\nlanguages = ["zh", "en"]\n\n[filters.en]\nmin_words = 1000000\n\n'
        f"[filters.zh]\nmin_language_score = {cutoff!r}",
    )
    dropped = read_jsonl(out / "dropped")
    assert {d["reason"] for d in dropped if d["language"] == "en"} == {"min_words"}
    assert sum(1 for d in dropped if d["language"] == "en") == 60
    low = {d["id"] for d in dropped if d["reason"] == "language_score"}
    assert low == {i for i, score in scores.items() if score < cutoff} and low
    languages = manifest["languages"]
    assert languages["zh"]["dropped"]["language_score"] == len(low)
    assert manifest["stages"]["language"]["dropped"]["language_score"] == len(low)
    assert languages["en"]["filters"]["min_words"] == 1_000_000
    assert languages["zh"]["filters"]["min_words"] != 1_000_000
    assert languages["en"]["kept_documents"] == 0
    assert languages["zh"]["kept_documents"] > 0
