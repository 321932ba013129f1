"""Data pipeline throughput, side by side on the same input in one run.

The input is the running Python's standard library: every module's source and every
docstring of at least 40 words, each a document (≈ 12 MB).

1. Near-duplicate detection, texts -> duplicate decisions: Loom (vectorised shingling, MinHash,
   banded LSH, verification, union-find) vs datasketch (MinHash.bulk + MinHashLSH + the same
   union-find), at the same number of permutations and the same bands × rows; recall and
   precision on planted near copies (true word-5-gram Jaccard ≥ threshold, measured
   independently).
2. Tokenization: Loom's tokenize-and-pack path (tokenize_kept: encode, pack, write tokens and
   index) vs calling `tokenizers`' encode_batch on the same texts.
3. The whole `loom data prepare` pipeline on 2 workers, in MB of input per second.

    python benchmarks/data_throughput.py   # writes the data_throughput section of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
from report import write_section  # benchmarks/ is on the path when a script in it runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from corpus import jaccard

from loom.core.tokenizer import load_tokenizer, save_tokenizer, train_bpe
from loom.data.dedup import DedupConfig, band_keys, bands_rows, near_duplicate_of
from loom.data.hashing import MinHasher, shingles
from loom.data.prepare import load_prepare_config, prepare
from loom.data.tasks import KEEP, TokenizeTask, tokenize_kept

STDLIB = Path(sysconfig.get_paths()["stdlib"])


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


def planted_corpus(
    texts: list[str], copies: int, seed: int = 0
) -> tuple[list[str], dict[int, float]]:
    """The texts, then near copies of some of them (2 % of words changed, or a sentence
    appended); returns all documents and, per copy index, its true Jaccard to its original."""
    rng = random.Random(seed)
    docs = list(texts)
    truth: dict[int, float] = {}
    for original in rng.sample(range(len(texts)), copies):
        words = texts[original].split(" ")
        if rng.random() < 0.5:
            for i in rng.sample(range(len(words)), max(1, len(words) // 50)):
                words[i] = rng.choice(["alpha", "beta", "gamma"])
            copy = " ".join(words)
        else:
            copy = texts[original] + " See also the related notes in the manual for details."
        truth[len(docs)] = jaccard(texts[original], copy)
        docs.append(copy)
    return docs, truth


def loom_near_duplicates(docs: list[str], cfg: DedupConfig, bands: int, rows: int) -> np.ndarray:
    hasher = MinHasher(cfg.num_perm, cfg.seed)
    sig = np.concatenate(
        [
            hasher.signatures([shingles(d, cfg.ngram) for d in docs[i : i + 1024]])
            for i in range(0, len(docs), 1024)
        ]
    )
    keys = band_keys(sig, bands, rows)
    return near_duplicate_of(keys, np.ones(len(docs), bool), lambda idx: sig[idx], cfg)


def datasketch_near_duplicates(
    docs: list[str], cfg: DedupConfig, bands: int, rows: int
) -> np.ndarray:
    from datasketch import MinHash, MinHashLSH

    sets = []
    for d in docs:
        words = d.lower().split()
        sets.append(
            [
                " ".join(words[i : i + cfg.ngram]).encode()
                for i in range(max(1, len(words) - cfg.ngram + 1))
            ]
        )
    hashes = MinHash.bulk(sets, num_perm=cfg.num_perm)
    lsh = MinHashLSH(num_perm=cfg.num_perm, params=(bands, rows))
    for i, h in enumerate(hashes):
        lsh.insert(i, h)
    parent = list(range(len(docs)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, h in enumerate(hashes):
        for j in lsh.query(h):
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.array([find(i) for i in range(len(docs))])


def score(
    keep_of: np.ndarray, docs: list[str], truth: dict[int, float], threshold: float
) -> tuple[float, float]:
    """Recall over the planted copies at or above the threshold; precision over every removal:
    a removal is right when the document really is that similar to the one it was merged into
    (the standard library has near duplicates of its own, so planted copies are not all)."""
    removed = [i for i in range(len(keep_of)) if keep_of[i] != i]
    positives = {i for i, j in truth.items() if j >= threshold}
    recall = len(set(removed) & positives) / len(positives)
    right = sum(jaccard(docs[i], docs[keep_of[i]]) >= threshold for i in removed)
    return recall, right / len(removed) if removed else 1.0


def bench_dedup(docs: list[str], truth: dict[int, float], rounds: int) -> list[str]:
    cfg = DedupConfig()
    bands, rows = bands_rows(cfg)
    times: dict[str, list[float]] = {"loom": [], "datasketch": []}
    results = {}
    for _ in range(rounds):
        for name, fn in (
            ("loom", loom_near_duplicates),
            ("datasketch", datasketch_near_duplicates),
        ):
            start = time.perf_counter()
            results[name] = fn(docs, cfg, bands, rows)
            times[name].append(time.perf_counter() - start)
    rows_out = []
    for name in ("loom", "datasketch"):
        recall, precision = score(results[name], docs, truth, cfg.threshold)
        rate = len(docs) / statistics.median(times[name])
        rows_out.append(f"| {name} | {rate:,.0f} | {recall:.1%} | {precision:.1%} |")
    ratio = statistics.median(times["datasketch"]) / statistics.median(times["loom"])
    positives = sum(j >= cfg.threshold for j in truth.values())
    header = [
        f"{len(docs):,} documents ({len(truth)} planted near copies, {positives} at Jaccard ≥ "
        f"{cfg.threshold}); word 5-grams, {cfg.num_perm} permutations, {bands} bands × {rows} rows "
        f"for both; median of {rounds} runs. **Loom / datasketch = {ratio:.1f}×**",
        "",
        "| near-duplicate detection | documents/s | recall (planted, J ≥ 0.8) "
        "| precision (J ≥ 0.8) |",
        "|---|---|---|---|",
    ]
    return header + rows_out


def bench_tokenize(texts: list[str], work: Path, rounds: int) -> list[str]:
    import zstandard

    tokenizer_dir = work / "tok"
    save_tokenizer(train_bpe(iter(texts), 8192), tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir)
    clean = work / "clean"
    clean.mkdir()
    with (
        (clean / "docs.jsonl.zst").open("wb") as raw,
        zstandard.ZstdCompressor().stream_writer(raw) as w,
    ):
        for i, t in enumerate(texts):
            w.write((json.dumps({"id": str(i), "text": t}) + "\n").encode())
    (clean / "filtered.jsonl").write_text("")
    megabytes = sum(len(t.encode()) for t in texts) / 1e6
    times: dict[str, list[float]] = {"loom": [], "encode_batch": []}
    for r in range(rounds):
        start = time.perf_counter()
        tokenize_kept(
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
        times["loom"].append(time.perf_counter() - start)
        start = time.perf_counter()
        tokenizer.encode_batch(texts, add_special_tokens=False)
        times["encode_batch"].append(time.perf_counter() - start)
    ratio = statistics.median(times["encode_batch"]) / statistics.median(times["loom"])
    return [
        f"{len(texts):,} documents, {megabytes:.1f} MB, 8,192-token BPE. Loom reads the compressed "
        "cleaned documents, encodes, packs and writes tokens + index; encode_batch only encodes "
        f"texts already in memory. **Loom / encode_batch = {ratio:.2f}×**",
        "",
        "| tokenization | MB/s |",
        "|---|---|",
        *(f"| {name} | {megabytes / statistics.median(t):.2f} |" for name, t in times.items()),
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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    texts = documents()
    docs, truth = planted_corpus(texts, copies=max(50, len(texts) // 20))
    sections = [*bench_dedup(docs, truth, args.rounds), ""]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "t").mkdir()
        sections += [*bench_tokenize(texts, work / "t", args.rounds), ""]
        (work / "p").mkdir()
        sections += bench_pipeline(texts, work / "p")
    body = "\n".join(sections)
    print(body)
    if not args.no_write:
        write_section("data_throughput", body)


if __name__ == "__main__":
    main()
