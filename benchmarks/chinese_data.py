"""Chinese data support, measured: the numbers behind `dedup.cjk`, `dedup.cjk_ngram = 2` and
configs/data-prepare-zh-en.toml.

The text is real: the Debian Reference in simplified Chinese, one document per section (175
sections), with near copies planted by tests/corpus.py `build_chinese` (one changed character
per sentence; paragraphs reordered; both; an exact copy of every fifth section). True
similarities are Python sets of token n-grams (tests/corpus.py), never Loom's hashes.

1. Shingle choice: for character n-grams (n = 1..4), jieba words and word 2-grams, and the
   whitespace-word 5-grams of `dedup.cjk = "off"`, the share of planted copies of each kind
   whose true Jaccard to the original stays ≥ 0.8 (and the median), and the highest Jaccard
   between two unrelated sections (the false-positive pressure).
2. Recall and precision of the whole dedup: `loom.data.prepare.prepare` (local executor, one
   worker, filters off) on the planted corpus, `dedup.cjk = "chars"` against `"off"`.
3. Speed of shingling + MinHash (128 permutations) on Chinese and English text, both modes,
   the order alternating by round; median and range of the rounds.
4. The mixed demo `loom data prepare configs/data-prepare-zh-en.toml` (Debian packages
   debian-reference-zh-cn and debian-reference-en): the funnel per detected language, the top
   drop reasons, and the wall time of the whole command.

Other processes' CPU use is recorded during every timed part, since the machine may be shared.

    python benchmarks/chinese_data.py     # ~1 minute on 2 quiet cores; writes BENCHMARKS.md
    python benchmarks/chinese_data.py --quick --no-write    # a check (~25 s)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from report import BENCHMARKS_MD, OtherCpu, write_section  # benchmarks/ is on sys.path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from corpus import (
    CHINESE_COPY_KINDS,
    DEBIAN_REFERENCE_ZH,
    ChineseCorpus,
    build_chinese,
    cjk_ngrams,
    docstring_documents,
    word_ngrams,
)

from loom.data.dedup import DedupConfig, bands_rows
from loom.data.executor import worker_count
from loom.data.hashing import CjkMode, MinHasher, shingles
from loom.data.prepare import load_prepare_config, prepare
from loom.data.segment import words_of

ROOT = Path(__file__).resolve().parents[1]
ZH_EN_CONFIG = ROOT / "configs" / "data-prepare-zh-en.toml"
DEBIAN_REFERENCE_EN = Path("/usr/share/debian-reference/debian-reference.en.txt.gz")
THRESHOLD = DedupConfig().threshold
Shingles = set[tuple[str, ...]]


def token_ngrams(tokens: list[str], n: int) -> Shingles:
    """n-grams of a token list; a list shorter than n is one n-gram (as Loom shingles)."""
    n = min(n, len(tokens))
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)} if n else set()


def jieba_ngrams(n: int) -> Callable[[str], Shingles]:
    return lambda text: token_ngrams(words_of(text.lower(), "jieba"), n)


def char_ngrams(n: int) -> Callable[[str], Shingles]:
    return lambda text: cjk_ngrams(text, cjk_n=n)


SHINGLINGS: dict[str, Callable[[str], Shingles]] = {
    **{f"characters, n = {n}": char_ngrams(n) for n in range(1, 5)},
    **{f"jieba words, n = {n}": jieba_ngrams(n) for n in (1, 2)},
    'whitespace words, n = 5 (`dedup.cjk = "off"`)': word_ngrams,
}


def jaccard(x: Shingles, y: Shingles) -> float:
    return len(x & y) / len(x | y) if x | y else 1.0


def share_cell(similarities: list[float]) -> str:
    """Share of the copies at or above the threshold, and their median similarity."""
    above = sum(j >= THRESHOLD for j in similarities) / len(similarities)
    return f"{above:.0%} ({statistics.median(similarities):.2f})"


def shingle_choice(corpus: ChineseCorpus) -> list[str]:
    """Table 1: how much of each planted copy survives each shingling, and how similar
    unrelated sections get."""
    texts = {r["id"]: r["text"] for r in corpus.records}
    rows = [
        "| shingles | "
        + " | ".join(f"{kind}: ≥ {THRESHOLD} (median)" for kind in CHINESE_COPY_KINDS)
        + " | unrelated sections: highest (99th pct.) |",
        "|---" * (2 + len(CHINESE_COPY_KINDS)) + "|",
    ]
    for name, make in SHINGLINGS.items():
        original = {doc: make(text) for doc, text in corpus.originals.items()}
        by_kind: dict[str, list[float]] = {kind: [] for kind in CHINESE_COPY_KINDS}
        for copy, (source, kind, _) in corpus.copies.items():
            if kind in by_kind:
                by_kind[kind].append(jaccard(original[source], make(texts[copy])))
        sets = list(original.values())
        unrelated = sorted(
            jaccard(sets[i], sets[k]) for i in range(len(sets)) for k in range(i + 1, len(sets))
        )
        p99 = unrelated[int(0.99 * (len(unrelated) - 1))]
        cells = " | ".join(share_cell(by_kind[kind]) for kind in CHINESE_COPY_KINDS)
        rows.append(f"| {name} | {cells} | {unrelated[-1]:.2f} ({p99:.2f}) |")
    return rows


def read_jsonl(folder: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for f in sorted(folder.glob("*.jsonl"))
        for line in f.read_text(encoding="utf-8").splitlines()
    ]


def planted_config(corpus: ChineseCorpus, work: Path) -> Path:
    """The planted corpus as two JSONL files and a prepare config for it: filters off (dedup
    alone decides), one worker, a small tokenizer (not measured here)."""
    raw = corpus.write_jsonl(work / "raw")
    config = work / "prepare.toml"
    config.write_text(
        f'[[sources]]\nname = "zh"\npaths = ["{raw}/*.jsonl"]\n'
        "[filters]\nenabled = false\n[tokenizer]\nvocab_size = 600\n"
        "[output]\nval_fraction = 0.0\n[executor]\nworkers = 1\n",
        encoding="utf-8",
    )
    return config


def dedup_recall(corpus: ChineseCorpus, work: Path) -> tuple[list[str], list[float]]:
    """Table 2 rows, and the cores other processes kept busy during each prepare run."""
    config = planted_config(corpus, work)
    similar = [(c, o, kind) for c, (o, kind, j) in corpus.copies.items() if j >= THRESHOLD]
    kinds = [*CHINESE_COPY_KINDS, "exact"]
    rows = [
        f"| `dedup.cjk` | pairs found / at J ≥ {THRESHOLD} | "
        + " | ".join(kinds)
        + " | documents dropped (exact + near) | wrongly dropped | prepare s |",
        "|---" * (5 + len(kinds)) + "|",
    ]
    other = []
    mode: CjkMode
    for mode in ("chars", "off"):
        out = work / f"out-{mode}"
        cfg = load_prepare_config(config, [f"--dedup.cjk={mode}", f"--output.dir={out}"])
        meter = OtherCpu()
        start = time.perf_counter()
        manifest = prepare(cfg)
        seconds = time.perf_counter() - start
        other.append(meter.stop())
        kept = {r["id"] for r in read_jsonl(out / "documents")}
        dropped = read_jsonl(out / "dropped")
        assert len(kept) + len(dropped) == len(corpus.records)
        root = {r["id"]: r["duplicate_of"] for r in dropped} | {doc: doc for doc in kept}
        found = {kind: 0 for kind in kinds}
        total = {kind: 0 for kind in kinds}
        for copy, original, kind in similar:
            total[kind] += 1
            found[kind] += root[copy] == root[original]
        wrong = sum(corpus.group_of(r["id"]) != corpus.group_of(r["duplicate_of"]) for r in dropped)
        by_stage = [manifest["stages"][s]["dropped"] for s in ("exact_dedup", "near_dedup")]
        exact, near = by_stage[0]["exact_duplicate"], by_stage[1]["near_duplicate"]
        cells = " | ".join(f"{found[k]}/{total[k]}" for k in kinds)
        rows.append(
            f'| `"{mode}"` | **{sum(found.values())}/{len(similar)}** | {cells} '
            f"| {exact + near} ({exact} + {near}) | {wrong} | {seconds:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows, other


def alternating(names: list[Any], rounds: int) -> Iterator[tuple[int, Any]]:
    """(round, name) in the order A, B, C, C, B, A, A, B, C, ..."""
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            yield r, name


def signatures(docs: list[str], mode: CjkMode, hasher: MinHasher) -> None:
    """What near dedup computes per document: its shingles and their MinHash signature."""
    cfg = DedupConfig()
    hasher.signatures([shingles(d, cfg.ngram, mode, cfg.cjk_ngram) for d in docs])


def spread(values: list[float], digits: int = 0) -> str:
    return (
        f"{statistics.median(values):,.{digits}f} "
        f"({min(values):,.{digits}f}–{max(values):,.{digits}f})"
    )


def speed(corpora: dict[str, list[str]], rounds: int, passes: int) -> tuple[list[str], list[float]]:
    """Table 3 rows, and the cores other processes kept busy during each timing."""
    hasher = MinHasher(DedupConfig().num_perm, DedupConfig().seed)
    sides = [(name, mode) for name in corpora for mode in ("chars", "off")]
    for name, mode in sides:  # first calls (the power tables) stay untimed
        signatures(corpora[name][:50], mode, hasher)
    seconds: dict[tuple[str, str], list[float]] = {side: [] for side in sides}
    other = []
    for _, (name, mode) in alternating(sides, rounds):
        meter = OtherCpu()
        start = time.perf_counter()
        for _ in range(passes):
            signatures(corpora[name], mode, hasher)
        seconds[name, mode].append((time.perf_counter() - start) / passes)
        other.append(meter.stop())
    rows = [
        "| text | `dedup.cjk` | documents/s | MB/s | time / time of `off` (per round) |",
        "|---|---|---|---|---|",
    ]
    for name, mode in sides:
        docs = corpora[name]
        megabytes = sum(len(d.encode("utf-8")) for d in docs) / 1e6
        times = seconds[name, mode]
        ratios = [t / o for t, o in zip(times, seconds[name, "off"], strict=True)]
        rows.append(
            f"| {name} | `{mode}` | {spread([len(docs) / t for t in times])} "
            f"| {spread([megabytes / t for t in times], 2)} "
            f"| {'—' if mode == 'off' else spread(ratios, 2)} |"
        )
    return rows, other


def zh_en_demo(work: Path) -> tuple[list[str], float, float, dict[str, Any]]:
    """Table 4 rows, the wall seconds and other processes' cores of the whole command, and its
    manifest."""
    out = work / "prepared-zh-en"
    meter = OtherCpu()
    start = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "loom", "data", "prepare", str(ZH_EN_CONFIG), f"--output.dir={out}"],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    busy = meter.stop()
    if run.returncode:
        sys.exit(f"loom data prepare {ZH_EN_CONFIG} failed:\n{run.stdout}{run.stderr}")
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    languages, stages = manifest["languages"], manifest["stages"]
    rows = [
        "| language | documents detected | kept after filters | kept after dedup | tokens "
        "| bytes/token | top drop reasons |",
        "|---|---|---|---|---|---|---|",
    ]

    def reasons(dropped: dict[str, int]) -> str:
        top = sorted(dropped.items(), key=lambda kv: -kv[1])[:4]
        return ", ".join(f"{reason} {n:,}" for reason, n in top)

    shown = [lang for lang, v in languages.items() if v["kept_documents"]]
    for lang in shown:
        v = languages[lang]
        filtered = stages["filter"]["per_language"][lang]["documents_out"]
        rows.append(
            f"| {lang} | {v['documents']:,} | {filtered:,} | {v['kept_documents']:,} "
            f"| {v['tokens']:,} | {v['bytes_per_token']:.2f} | {reasons(v['dropped'])} |"
        )
    others = [v for lang, v in languages.items() if lang not in shown]
    if others:
        dropped: dict[str, int] = {}
        for v in others:
            for reason, n in v["dropped"].items():
                dropped[reason] = dropped.get(reason, 0) + n
        count = sum(v["documents"] for v in others)
        rows.append(f"| {len(others)} others | {count:,} | 0 | 0 | 0 | — | {reasons(dropped)} |")
    return rows, seconds, busy, manifest


def busy_note(other: list[float]) -> str:
    return (
        f"Other processes kept {statistics.median(other):.2f} cores busy meanwhile (median; "
        f"highest {max(other):.2f})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="speed rounds (≥ 3)")
    parser.add_argument("--passes", type=int, default=10, help="passes over the text per timing")
    parser.add_argument("--quick", action="store_true", help="3 rounds of 2 passes: a check")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    rounds, passes = (3, 2) if args.quick else (max(args.rounds, 3), args.passes)
    for path in (DEBIAN_REFERENCE_ZH, DEBIAN_REFERENCE_EN):
        if not path.is_file():
            sys.exit(
                f"{path} is missing: apt-get install debian-reference-zh-cn debian-reference-en"
            )
    started = time.perf_counter()
    corpus = build_chinese()
    english = [text for _, text in docstring_documents()]
    chinese = [r["text"] for r in corpus.records]
    cfg = DedupConfig()
    bands, rows_per_band = bands_rows(cfg)
    mostly_words = sum(  # sections that Loom (and cjk_ngrams) shingle with word 5-grams
        cjk_ngrams(t, cjk_n=2) == cjk_ngrams(t, cjk_n=5) for t in corpus.originals.values()
    )
    n_similar = sum(j >= THRESHOLD for _, _, j in corpus.copies.values())
    table1 = shingle_choice(corpus)
    print("\n".join(table1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "planted").mkdir()
        table2, other2 = dedup_recall(corpus, work / "planted")
        table3, other3 = speed({"Chinese": chinese, "English": english}, rounds, passes)
        print("\n".join(table3), flush=True)
        table4, demo_seconds, other4, manifest = zh_en_demo(work)
    demo_workers = worker_count(load_prepare_config(ZH_EN_CONFIG, []).executor)
    zh_mb = sum(len(t.encode("utf-8")) for t in chinese) / 1e6
    en_mb = sum(len(t.encode("utf-8")) for t in english) / 1e6
    sections = [
        "Real text: the Debian Reference in simplified Chinese, one document per section "
        f"({len(corpus.originals)} sections), with near copies planted by tests/corpus.py "
        "`build_chinese`: one per section of each kind (one CJK character changed per "
        "sentence; paragraphs reordered; both) and an exact copy of every fifth section. True "
        "Jaccard is computed with Python sets of token n-grams (tests/corpus.py `cjk_ngrams`, "
        '`word_ngrams`; jieba words from `loom.data.segment.words_of(text, "jieba")`), '
        "independently of Loom's hashing.",
        "",
        "**1. Which shingles for Chinese.** Cells: share of the copies whose Jaccard to their "
        f"original stays ≥ {THRESHOLD} (the dedup threshold), and the median. Last column: "
        f"the highest Jaccard between two different sections ({len(corpus.originals)} choose 2 "
        "pairs), and the 99th percentile; sections of one book on one topic, so this is "
        "the false-positive pressure. Character rows follow Loom's rule: a section under half "
        f"CJK tokens ({mostly_words} of {len(corpus.originals)}) uses word 5-grams; jieba rows "
        "are n-grams of all words. Single "
        "characters and single jieba words keep the most copies but bring unrelated sections "
        "closest; from 3 characters (or 2 words) on, a changed character breaks so many "
        "shingles that copies fall below the threshold. Hence `dedup.cjk_ngram = 2`.",
        "",
        *table1,
        "",
        f"**2. Recall and precision of the whole dedup.** `loom.data.prepare.prepare` on the "
        f"planted corpus ({len(corpus.records)} documents in 2 JSONL files, shuffled; "
        f"{n_similar} copy–original pairs at true character-2-gram Jaccard ≥ {THRESHOLD}), "
        "local executor with one worker, filters off so that dedup alone decides, defaults "
        f"otherwise ({cfg.num_perm} permutations, {bands} bands × {rows_per_band} rows, word "
        f"{cfg.ngram}-grams, CJK character {cfg.cjk_ngram}-grams). A pair is found when copy and "
        "original end at the same kept document (`duplicate_of` in dropped/). Wrongly dropped: "
        "dropped for a document that is not a copy of the same section. "
        '`"off"` is the behaviour before CJK tokens: whitespace words, where a Chinese clause '
        f"is one word. {busy_note(other2)}",
        "",
        *table2,
        "",
        f"**3. Speed of shingling + MinHash** ({cfg.num_perm} permutations, one core): the "
        f"Chinese corpus above ({len(chinese)} documents, {zh_mb:.2f} MB of UTF-8, 3 bytes per "
        f"Chinese character) and the standard library's docstrings ({len(english)} documents, "
        f"{en_mb:.2f} MB). {rounds} rounds of {passes} passes each, the order alternating by "
        "round; median (lowest–highest) of the rounds. English text has no character at or "
        'above U+1100, so `"chars"` takes the whitespace path there. '
        f"{busy_note(other3)}",
        "",
        *table3,
        "",
        "**4. The mixed demo** `loom data prepare configs/data-prepare-zh-en.toml` (the Debian "
        "Reference in Chinese and English, one document per paragraph; language ID keeps zh "
        "and en, Chinese filtered on jieba words, dedup on CJK character shingles, one 8,192 "
        f"BPE tokenizer for both) as one command in a fresh process, {demo_workers} workers: "
        f"**{demo_seconds:.1f} s** wall for {manifest['documents']['read']:,} documents read, "
        f"{manifest['documents']['kept']:,} kept, {manifest['tokens']:,} tokens. Per detected "
        "language (`manifest.languages`; languages that kept nothing summed as others). "
        f"Other processes kept {other4:.2f} cores busy meanwhile.",
        "",
        *table4,
    ]
    body = "\n".join(sections)
    print(body)
    print(f"total {time.perf_counter() - started:.0f} s", flush=True)
    if not args.no_write:
        start = "<!-- chinese_data:start -->"
        if start not in (BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""):
            with BENCHMARKS_MD.open("a") as fh:  # a heading, as the other sections have
                fh.write(
                    "\n## Chinese data: shingles, dedup, speed, the zh+en demo "
                    "(`benchmarks/chinese_data.py`)\n"
                )
        write_section("chinese_data", body)


if __name__ == "__main__":
    main()
