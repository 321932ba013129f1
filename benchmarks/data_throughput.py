"""Data pipeline throughput, side by side on the same input in one run.

The input is the running Python's standard library: every module's source and every
docstring of at least 40 words, each a document (≈ 12 MB), with near copies planted.

1. Near-duplicate detection, texts -> duplicate decisions, at the same word n-grams, number of
   permutations and bands × rows: Loom (vectorised shingling, MinHash, banded LSH,
   verification, union-find); datasketch (MinHash.bulk, MinHashLSH, and the verification Loom
   does: `MinHash.jaccard` against the same cutoff); datatrove's four-stage MinHash pipeline
   (signatures, buckets, clusters, filter) on LocalPipelineExecutor, which has no verification.
   Every peer is given Loom's shingles, so all hash the same sets; datatrove runs once more
   with its own shingling. Recall and precision on planted near copies (true Jaccard ≥
   threshold, measured independently in tests/corpus.py). Then the same on tests/corpus.py's
   planted Chinese corpus (Debian Reference sections; Loom's shingles are CJK character
   2-grams there).
2. Tokenization: Loom's tokenize-and-pack path (tokenize_kept: read, encode, pack, write tokens
   and index) vs `tokenizers`' encode_batch_fast, the call Loom makes, on the same texts.
3. The whole `loom data prepare` pipeline on 2 workers, in MB of input per second.

Sides alternate by round (A, B, C, C, B, A, ...); each ratio is the median of per-round
ratios with the lowest and highest, "parity" when that spread covers 1.0. The cores other
processes kept busy during the timed runs are recorded, since the machine may be shared.

    python benchmarks/data_throughput.py   # writes the data_throughput section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import io
import json
import math
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.utils.hashing import HashConfig
from report import write_section  # benchmarks/ is on the path when a script in it runs
from serve_load import CpuMeter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from corpus import build_chinese, cjk_jaccard, jaccard

from loom.core.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from loom.data.dedup import DedupConfig, band_keys, bands_rows, near_duplicate_of
from loom.data.hashing import MinHasher, shingles
from loom.data.prepare import load_prepare_config, prepare
from loom.data.tasks import KEEP, TokenizeTask, tokenize_kept

STDLIB = Path(sysconfig.get_paths()["stdlib"])
T = TypeVar("T")


def stdlib_files() -> list[Path]:
    return [p for p in sorted(STDLIB.rglob("*.py")) if not {"site-packages", "test"} & set(p.parts)]


def documents(min_words: int = 40) -> list[str]:
    """Every standard-library source file, and every docstring of ≥ min_words words in them."""
    texts = []
    for path in stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        texts.append(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc.split()) >= min_words:
                    texts.append(doc)
    return list(dict.fromkeys(texts))  # drop the standard library's own exact repeats


Truth = dict[int, tuple[int, float]]  # planted copy index -> (its original's index, true Jaccard)


def planted_corpus(texts: list[str], copies: int, seed: int = 0) -> tuple[list[str], Truth]:
    """The texts, then near copies of some of them (2 % of words changed, or a sentence
    appended); returns all documents and the truth of the copies."""
    rng = random.Random(seed)
    docs = list(texts)
    truth: Truth = {}
    for original in rng.sample(range(len(texts)), copies):
        words = texts[original].split(" ")
        if rng.random() < 0.5:
            for i in rng.sample(range(len(words)), max(1, len(words) // 50)):
                words[i] = rng.choice(["alpha", "beta", "gamma"])
            copy = " ".join(words)
        else:
            copy = texts[original] + " See also the related notes in the manual for details."
        truth[len(docs)] = (original, jaccard(texts[original], copy))
        docs.append(copy)
    return docs, truth


def doc_shingles(text: str, cfg: DedupConfig) -> np.ndarray:
    """Loom's shingles of one document (the call clean_file makes), the one definition every
    peer is given."""
    return shingles(text, cfg.ngram, cfg.cjk, cfg.cjk_ngram)


def verification_cutoff(cfg: DedupConfig) -> float:
    """The signature agreement `dedup.near_duplicate_of` requires of a candidate pair: the
    threshold minus three standard errors of the estimate."""
    t = cfg.threshold
    return t - 3 * math.sqrt(t * (1 - t) / cfg.num_perm)


def keep_first(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """For each document, the first (in input order) of its cluster after joining the pairs:
    the document Loom keeps."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        a, b = find(i), find(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(n)])


def loom_near_duplicates(docs: list[str], cfg: DedupConfig, work: Path) -> np.ndarray:
    bands, rows = bands_rows(cfg)
    hasher = MinHasher(cfg.num_perm, cfg.seed)
    sig = np.concatenate(
        [
            hasher.signatures([doc_shingles(d, cfg) for d in docs[i : i + 1024]])
            for i in range(0, len(docs), 1024)
        ]
    )
    keys = band_keys(sig, bands, rows)
    return near_duplicate_of(keys, np.ones(len(docs), bool), lambda idx: sig[idx], cfg)


def datasketch_near_duplicates(docs: list[str], cfg: DedupConfig, work: Path) -> np.ndarray:
    """MinHash.bulk over the top 32 bits of Loom's shingle hashes (the values Loom permutes;
    an identity `hashfunc`, as datasketch documents for pre-hashed input), MinHashLSH with
    Loom's bands × rows, and each candidate verified as Loom does."""
    from datasketch import MinHash, MinHashLSH

    bands, rows = bands_rows(cfg)
    values = {}
    for i, d in enumerate(docs):
        s = doc_shingles(d, cfg)
        if len(s):  # Loom leaves documents without words out of the search too
            values[i] = (s >> np.uint64(32)).astype(np.uint32).tolist()
    hashes = dict(
        zip(
            values,
            MinHash.bulk(values.values(), num_perm=cfg.num_perm, seed=cfg.seed, hashfunc=int),
            strict=True,
        )
    )
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(bands, rows))
    with lsh.insertion_session() as session:
        for i, h in hashes.items():
            session.insert(i, h)
    cutoff = verification_cutoff(cfg)
    pairs = [
        (i, j)
        for i, h in hashes.items()
        for j in lsh.query(h)
        if j > i and h.jaccard(hashes[j]) >= cutoff
    ]
    return keep_first(len(docs), pairs)


class LoomShingleSignature(MinhashDedupSignature):
    """datatrove's signature stage hashing Loom's shingles (full 64-bit values, as its own
    xxhash64 shingles are) instead of its own normalise-tokenise-hash."""

    def __init__(self, output_folder: str, config: MinhashConfig, dedup: DedupConfig) -> None:
        super().__init__(output_folder, config=config)
        self.dedup = dedup

    def get_shingles(self, text: str) -> np.ndarray:
        return doc_shingles(text, self.dedup).reshape(-1, 1)


def datatrove_near_duplicates(
    docs: list[str], cfg: DedupConfig, work: Path, own_shingling: bool = False
) -> np.ndarray:
    """datatrove's MinHash dedup as its README runs it: four LocalPipelineExecutor stages
    (one task, the buckets stage one task per bucket, one worker), signatures and matches on
    disk under `work`. Returns, for each document, the one kept for its cluster."""
    bands, rows = bands_rows(cfg)
    # datatrove 0.10's default xxhash64 passes str, which xxhash ≥ 4 refuses (datatrove issue
    # 508): its own shingling uses its other 64-bit hash, SHA-1.
    config = MinhashConfig(
        n_grams=cfg.ngram,
        num_buckets=bands,
        hashes_per_bucket=rows,
        seed=cfg.seed,
        hash_config=HashConfig(precision=64, hash_fc="sha1"),
    )
    sigs, matches, clusters = (str(work / d) for d in ("signatures", "buckets", "clusters"))
    documents = [Document(text=t, id=str(i)) for i, t in enumerate(docs)]
    signature = (
        MinhashDedupSignature(sigs, config=config)
        if own_shingling
        else LoomShingleSignature(sigs, config, cfg)
    )
    kept: list[int] = []

    def collect(data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> Iterator[Document]:
        for doc in data:
            kept.append(int(doc.id))
            yield doc

    stages = [
        ([documents, signature], 1),
        ([MinhashDedupBuckets(sigs, matches, config=config)], bands),
        ([MinhashDedupCluster(matches, clusters, config, save_cluster_id=True)], 1),
        ([documents, MinhashDedupFilter(clusters), collect], 1),
    ]
    with contextlib.redirect_stderr(io.StringIO()):  # its INFO log, also kept under work/
        for k, (pipeline, tasks) in enumerate(stages):
            LocalPipelineExecutor(
                pipeline, tasks=tasks, workers=1, logging_dir=str(work / f"logs-{k}")
            ).run()
    return datatrove_keep_of(len(docs), work / "clusters", kept)


def datatrove_keep_of(n: int, clusters: Path, kept: list[int]) -> np.ndarray:
    """Each document's kept cluster member, from the cluster stage's `.clusters` (document,
    cluster id) and `.remove` (document) files; checks the filter kept exactly the rest."""
    keep_of = np.arange(n)
    if (clusters / "000000.remove").exists():
        removed = np.fromfile(clusters / "000000.remove", dtype="<u4").astype(np.int64)
        member = np.fromfile(clusters / "000000.clusters", dtype="<u4").reshape(-1, 2)
        cluster_of = dict(member.tolist())
        gone = set(removed.tolist())
        survivor = {c: d for d, c in cluster_of.items() if d not in gone}
        for d in gone:
            keep_of[d] = survivor[cluster_of[d]]
    assert sorted(kept) == np.flatnonzero(keep_of == np.arange(n)).tolist()
    return keep_of


DETECTORS: dict[str, Callable[[list[str], DedupConfig, Path], np.ndarray]] = {
    "loom": loom_near_duplicates,
    "datasketch + verification": datasketch_near_duplicates,
    "datatrove": datatrove_near_duplicates,
    "datatrove, own shingling": functools.partial(datatrove_near_duplicates, own_shingling=True),
}


def score(
    keep_of: np.ndarray,
    docs: list[str],
    truth: Truth,
    threshold: float,
    similarity: Callable[[str, str], float],
) -> tuple[float, float]:
    """Recall over the planted copies at or above the threshold: found when copy and original
    end in one cluster (either may come first); precision over every removal: right when the
    document really is that similar to the one it was merged into (the standard library has
    near duplicates of its own, so planted copies are not all)."""
    removed = [i for i in range(len(keep_of)) if keep_of[i] != i]
    positives = [(c, o) for c, (o, j) in truth.items() if j >= threshold]
    recall = sum(keep_of[c] == keep_of[o] for c, o in positives) / len(positives)
    right = sum(similarity(docs[i], docs[keep_of[i]]) >= threshold for i in removed)
    return recall, right / len(removed) if removed else 1.0


def chinese_corpus() -> tuple[list[str], Truth]:
    """tests/corpus.py's planted Chinese corpus (Debian Reference sections and their near
    copies, shuffled), with the copies' character-2-gram Jaccard to their originals."""
    c = build_chinese()
    docs = [r["text"] for r in c.records]
    index = {r["id"]: i for i, r in enumerate(c.records)}
    truth = {index[copy]: (index[original], j) for copy, (original, _, j) in c.copies.items()}
    return docs, truth


def alternating(names: list[str], rounds: int) -> Iterator[tuple[int, str]]:
    """(round, name) in the order A, B, C, C, B, A, A, B, C, ..."""
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            yield r, name


def timed(run: Callable[..., T], *args: Any) -> tuple[T, float, float]:
    """run(*args)'s result, its wall seconds, and the cores other processes kept busy
    meanwhile."""
    meter = CpuMeter()
    start = time.perf_counter()
    result = run(*args)
    seconds = time.perf_counter() - start
    return result, seconds, meter.stop()["other_cores"]


def verdict(low: float, high: float) -> str:
    """What the per-round spread of Loom / peer supports."""
    if low <= 1.0 <= high:
        return "parity"
    return "Loom faster" if low > 1.0 else "Loom slower"


def ratio_cells(loom: list[float], peer: list[float]) -> str:
    """Loom / peer speed: median of per-round ratios, lowest–highest, and the verdict."""
    ratios = [p / t for t, p in zip(loom, peer, strict=True)]
    low, high = min(ratios), max(ratios)
    return f"**{statistics.median(ratios):.2f}×** ({low:.2f}–{high:.2f}) | {verdict(low, high)}"


def busy_note(other: list[float]) -> str:
    return (
        f"Other processes kept {statistics.median(other):.2f} cores busy during the timed runs "
        f"(median; highest {max(other):.2f})."
    )


def bench_dedup(
    docs: list[str],
    truth: Truth,
    similarity: Callable[[str, str], float],
    detectors: list[str],
    rounds: int,
    work: Path,
) -> tuple[str, list[str]]:
    """The corpus and machine facts, and the table rows, of the named detectors on `docs`."""
    cfg = DedupConfig()
    times: dict[str, list[float]] = {name: [] for name in detectors}
    results: dict[str, np.ndarray] = {}
    other: list[float] = []
    for name in detectors:  # imports and first calls (spaCy's) stay untimed
        (work / f"warm-{name}").mkdir()
        DETECTORS[name](docs[:100], cfg, work / f"warm-{name}")
    for r, name in alternating(detectors, rounds):
        folder = work / f"{r}-{detectors.index(name)}"
        folder.mkdir()
        keep_of, seconds, busy = timed(DETECTORS[name], docs, cfg, folder)
        print(f"round {r} {name}: {seconds:.2f} s (others {busy:.2f} cores)", flush=True)
        assert name not in results or np.array_equal(results[name], keep_of)  # deterministic
        results[name] = keep_of
        times[name].append(seconds)
        other.append(busy)
    positives = sum(j >= cfg.threshold for _, j in truth.values())
    facts = (
        f"{len(docs):,} documents ({len(truth)} planted copies, {positives} at Jaccard ≥ "
        f"{cfg.threshold}). {busy_note(other)}"
    )
    rows = [
        "| near-duplicate detection | documents/s | Loom / peer (per round) | verdict "
        f"| recall (planted, J ≥ {cfg.threshold}) | precision (J ≥ {cfg.threshold}) |",
        "|---|---|---|---|---|---|",
    ]
    for name in detectors:
        recall, precision = score(results[name], docs, truth, cfg.threshold, similarity)
        rate = len(docs) / statistics.median(times[name])
        ratio = "— | —" if name == "loom" else ratio_cells(times["loom"], times[name])
        rows.append(f"| {name} | {rate:,.0f} | {ratio} | {recall:.1%} | {precision:.1%} |")
    return facts, rows


def dedup_method(rounds: int) -> str:
    """How the near-duplicate detectors are compared (both corpora)."""
    cfg = DedupConfig()
    bands, rows = bands_rows(cfg)
    return (
        f"{bands} bands × {rows} rows for all, {cfg.num_perm} permutations for Loom and "
        f"datasketch ({bands * rows} for datatrove, which computes only the banded ones); "
        f"{rounds} rounds, the order alternating by round; one process each. Every peer is given "
        "Loom's shingles (word 5-grams of the lower-cased text; CJK character 2-grams in a "
        "document at least half CJK), so all hash the same sets (datasketch the top 32 bits Loom "
        "permutes, with an identity hashfunc; datatrove the 64-bit hashes in place of its own): "
        "the times compare MinHash, LSH, verification and clustering. Loom and datasketch keep a "
        "candidate pair when its signature agreement is ≥ "
        f"{verification_cutoff(cfg):.3f} (the threshold minus 3 standard errors); datatrove "
        "has no verification: every band match is a duplicate, and a cluster keeps its union-find "
        "root, not its first document. datatrove's times include its stages' start-up and "
        "signature files on disk, as a LocalPipelineExecutor user pays. 'Own shingling' is "
        "datatrove as shipped: text normalised (numbers → 0, punctuation removed, diacritics "
        "stripped), spaCy's English word tokenizer, a 64-bit hash of each 5-gram (SHA-1: its "
        "default xxhash64 fails on xxhash ≥ 4, datatrove issue 508), and no shingle at all for "
        "a document under 5 words; its precision is judged by Loom's 5-grams, which it did not "
        "use. Precision counts every removal, planted or not: right when the document's true "
        "Jaccard (tests/corpus.py) to the one it was merged into is ≥ the threshold."
    )


def bench_tokenize(texts: list[str], work: Path, rounds: int) -> list[str]:
    import zstandard

    tokenizer_dir = work / "tok"
    save_tokenizer(train_bpe(iter(texts), 8192), tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.encode_special_tokens = True  # as tokenize_kept sets it
    clean = work / "clean"
    clean.mkdir()
    with (
        (clean / "docs.jsonl.zst").open("wb") as raw,
        zstandard.ZstdCompressor().stream_writer(raw) as w,
    ):
        for i, t in enumerate(texts):
            record = {"id": str(i), "language": "en", "text": t}  # as clean_file writes it
            w.write((json.dumps(record) + "\n").encode())
    (clean / "filtered.jsonl").write_text("")
    megabytes = sum(len(t.encode()) for t in texts) / 1e6

    def loom(r: int) -> object:
        return tokenize_kept(
            TokenizeTask(
                folder=str(work / f"tokens-{r}"),
                clean_folder=str(clean),
                source="bench",
                status=np.full(len(texts), KEEP, np.uint8),
                duplicate_of={},
                first_index=0,
                tokenizer=str(tokenizer_dir),
                val_fraction=0.01,
                seed=0,
                documents_file="",
                dropped_file="",
            )
        )

    sides: dict[str, Callable[[int], object]] = {
        "loom": loom,
        "encode_batch_fast": lambda r: tokenizer.encode_batch_fast(texts, add_special_tokens=False),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    other: list[float] = []
    for r, name in alternating(list(sides), rounds):
        _, seconds, busy = timed(sides[name], r)
        times[name].append(seconds)
        other.append(busy)
    return [
        f"{len(texts):,} documents, {megabytes:.1f} MB, 8,192-token BPE; {rounds} rounds, the "
        "order alternating by round. Loom reads the compressed cleaned documents, encodes with "
        "`encode_batch_fast` in 8 MB batches, packs and writes tokens + index; the peer makes "
        "the same `encode_batch_fast` call (same tokenizer, same settings) on texts already in "
        f"memory, so the ratio is what the rest of Loom's stage costs. {busy_note(other)}",
        "",
        "| tokenization | MB/s | Loom / peer (per round) | verdict |",
        "|---|---|---|---|",
        f"| loom | {megabytes / statistics.median(times['loom']):.2f} | — | — |",
        f"| encode_batch_fast | {megabytes / statistics.median(times['encode_batch_fast']):.2f} "
        f"| {ratio_cells(times['loom'], times['encode_batch_fast'])} |",
    ]


def bench_pipeline(texts: list[str], work: Path) -> list[str]:
    raw = work / "raw"
    raw.mkdir()
    for part in range(8):
        with (raw / f"part-{part}.jsonl").open("w") as fh:
            for t in texts[part::8]:
                fh.write(json.dumps({"text": t}) + "\n")
    megabytes = sum(f.stat().st_size for f in raw.iterdir()) / 1e6
    config = work / "prepare.toml"
    config.write_text(
        f'[[sources]]\nname = "stdlib"\npaths = ["{raw}/*.jsonl"]\n[tokenizer]\nvocab_size = 8192\n'
        f'[output]\ndir = "{work}/out"\n[executor]\nworkers = 2\n'
    )
    start = time.perf_counter()
    manifest = prepare(load_prepare_config(config, []))
    seconds = time.perf_counter() - start
    kept = manifest["documents"]["kept"]
    return [
        f"`loom data prepare` on {megabytes:.1f} MB of JSONL (8 files, {len(texts):,} documents: "
        "standard-library modules and their docstrings; all stages, default settings, 2 worker "
        f"processes, cold start): {seconds:.1f} s = "
        f"**{megabytes / seconds:.2f} MB/s**; {kept:,} documents kept, "
        f"{manifest['tokens']:,} tokens.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--max-documents", type=int, default=0, help="only the first N texts (a quick check)"
    )
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    texts = documents()[: args.max_documents or None]
    docs, truth = planted_corpus(texts, copies=max(50, len(texts) // 20))
    chinese, chinese_truth = chinese_corpus()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for part in ("en", "zh", "t", "p"):
            (work / part).mkdir()
        english = bench_dedup(docs, truth, jaccard, list(DETECTORS), args.rounds, work / "en")
        zh_detectors = [d for d in DETECTORS if d != "datatrove, own shingling"]
        zh = bench_dedup(
            chinese, chinese_truth, cjk_jaccard, zh_detectors, args.rounds, work / "zh"
        )
        sections = [
            dedup_method(args.rounds),
            "",
            "**English**: the standard library's modules and docstrings, near copies planted "
            f"(2 % of words changed, or a sentence appended); {english[0]}",
            "",
            *english[1],
            "",
            "**Chinese**: tests/corpus.py `build_chinese`, the Debian Reference in simplified "
            "Chinese by section, each with three near copies (one character changed per "
            "sentence, paragraphs reordered, both) and every fifth with an exact copy; true "
            f"Jaccard of character 2-grams. datatrove's own shingling is left out here (its "
            f"Chinese word tokenizer needs jieba). {zh[0]}",
            "",
            *zh[1],
            "",
            *bench_tokenize(texts, work / "t", args.rounds),
            "",
            *bench_pipeline(texts, work / "p"),
        ]
    body = "\n".join(sections)
    print(body)
    if not args.no_write:
        write_section("data_throughput", body)


if __name__ == "__main__":
    main()
