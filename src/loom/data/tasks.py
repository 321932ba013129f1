"""The per-file tasks of `loom data prepare`, run in parallel (see executor.py).

Each task writes into `<work>/<task>.tmp/` and renames it to `<work>/<task>/` when complete
(see `resumable`), so a task folder that exists is finished and a restarted run skips it.

clean_file (stage A): read -> normalise -> filter -> redact PII, one input file; writes the
kept documents, their exact hashes, MinHash signatures and LSH band keys.
tokenize_kept (stage C): the documents of one cleaned file that survived deduplication ->
token ids, with their train/validation assignment; writes the `documents/` and `dropped/`
outputs of that file too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import zstandard

from loom.core.tokenizer import eos_id, load_tokenizer
from loom.data.dedup import DedupConfig, band_keys
from loom.data.filters import FilterConfig, QualityFilter, filters_for
from loom.data.hashing import MinHasher, shingles
from loom.data.language import LanguageDetector
from loom.data.normalize import NormalizeConfig, normalize
from loom.data.pii import PiiConfig, redact
from loom.data.readers import DropReport, TextUnit, read_file
from loom.data.shards import token_dtype
from loom.data.tokenize import is_validation

DOCS_FILE = "docs.jsonl.zst"
STATS_FILE = "stats.json"
_SIGNATURE_BATCH = 1024  # documents per MinHash batch
_TOKENIZE_BATCH_BYTES = 8 << 20

KEEP, EXACT_DUPLICATE, NEAR_DUPLICATE = 0, 1, 2
REASONS = {EXACT_DUPLICATE: "exact_duplicate", NEAR_DUPLICATE: "near_duplicate"}


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


Stats = dict[str, Any]


def resumable(work: Callable[[Any, Path], Stats]) -> Callable[[Any], Stats]:
    """Run `work(task, tmp)` unless `task.folder` is already complete; publish its `tmp`
    folder (with the stats it returns) by renaming it when it has finished."""

    def run(task: Any) -> Stats:
        folder = Path(task.folder)
        if (folder / STATS_FILE).is_file():
            return json.loads((folder / STATS_FILE).read_text())
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        stats = work(task, tmp)
        (tmp / STATS_FILE).write_text(json.dumps(stats))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        return stats

    # Pickled by reference as the module-level name; no __wrapped__, because executors such as
    # Ray read the signature of what they run, and that is run(task).
    run.__name__, run.__qualname__, run.__module__ = (
        work.__name__,
        work.__qualname__,
        work.__module__,
    )
    run.__doc__ = work.__doc__
    return run


def read_docs(folder: Path) -> Iterator[dict[str, str]]:
    """The kept documents of a cleaned task: {"id", "text"} in input order."""
    with (folder / DOCS_FILE).open("rb") as fh:
        reader = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(fh))
        for line in reader:
            yield json.loads(line)


# -- stage A ----------------------------------------------------------------------------------


@dataclass
class CleanTask:
    folder: str
    source: str
    path: str
    name: str  # prefix of generated document ids: "<source>:<file>"
    text_field: str
    text_unit: TextUnit
    strict: bool
    normalize: NormalizeConfig
    filters: FilterConfig
    pii: PiiConfig
    dedup: DedupConfig
    bands: int
    rows: int


def _language_entry() -> dict[str, Any]:
    return {
        "documents": 0,
        "bytes": 0,
        "language_dropped": {},
        "language_dropped_bytes": 0,
        "filtered": {},
        "filtered_bytes": 0,
        "kept_documents": 0,
        "kept_bytes": 0,
    }


def _language_reason(
    cfg: FilterConfig, language_cfg: FilterConfig, language: str, score: float
) -> str | None:
    """Why language selection drops a document, or None: not one of `filters.languages`, or
    detected with a probability under the language's `min_language_score`. A document without
    letters (score 0, the fallback language) is left to the filters."""
    if cfg.languages and language not in cfg.languages:
        return "wrong_language"
    if 0 < score < language_cfg.min_language_score:
        return "language_score"
    return None


@resumable
def clean_file(task: CleanTask, tmp: Path) -> Stats:
    drops = DropReport()
    detector = LanguageDetector()
    quality: dict[str, QualityFilter] = {}  # one per language met, with that language's settings
    redactions: Counter[str] = Counter()
    hasher = MinHasher(task.dedup.num_perm, task.dedup.seed) if task.dedup.near else None
    stats: dict[str, Any] = {
        "documents": 0,
        "bytes": 0,
        "read_documents": 0,
        "read_bytes": 0,
        "normalized_bytes": 0,
        "language_dropped": {},  # wrong_language, language_score
        "language_dropped_bytes": 0,
        "filtered": {},
        "filtered_bytes": 0,
        "kept_documents": 0,
        "kept_bytes": 0,
    }
    # Per detected language: normalised documents and bytes, then what the filters kept.
    languages: dict[str, dict[str, Any]] = {}
    filtered: Counter[str] = Counter()
    hashes: list[int] = []
    ids: list[str] = []
    sizes: list[int] = []
    kept_languages: list[str] = []
    signatures: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    with (
        (tmp / DOCS_FILE).open("wb") as raw,
        zstandard.ZstdCompressor(level=3).stream_writer(raw) as docs,
        (tmp / "filtered.jsonl").open("w", encoding="utf-8") as dropped,
    ):
        for doc in read_file(
            Path(task.path), task.name, drops, task.text_field, task.text_unit, task.strict
        ):
            size = len(doc.text.encode("utf-8"))
            stats["read_documents"] += 1
            stats["read_bytes"] += size
            text = normalize(doc.text, task.normalize)
            size = len(text.encode("utf-8"))
            stats["normalized_bytes"] += size
            # No letters to go by (empty, numbers, symbols): the configured fallback language.
            language, score = detector.detect(text)
            language = language or task.filters.language
            entry = languages.setdefault(language, _language_entry())
            entry["documents"] += 1
            entry["bytes"] += size
            if language not in quality:
                quality[language] = QualityFilter(filters_for(task.filters, language))
            reason = _language_reason(task.filters, quality[language].cfg, language, score)
            if reason is not None:
                stats["language_dropped"][reason] = stats["language_dropped"].get(reason, 0) + 1
                stats["language_dropped_bytes"] += size
                entry["language_dropped"][reason] = entry["language_dropped"].get(reason, 0) + 1
                entry["language_dropped_bytes"] += size
                record = {"id": doc.id, "reason": reason, "language": language}
                dropped.write(json.dumps(record) + "\n")
                continue
            reason = "empty_after_normalize" if not text.strip() else quality[language].check(text)
            if reason is not None:
                filtered[reason] += 1
                entry["filtered"][reason] = entry["filtered"].get(reason, 0) + 1
                entry["filtered_bytes"] += size
                stats["filtered_bytes"] += size
                record = {"id": doc.id, "reason": reason, "language": language}
                dropped.write(json.dumps(record) + "\n")
                continue
            text = redact(text, task.pii, redactions)
            record = {"id": doc.id, "language": language, "text": text}
            docs.write((json.dumps(record) + "\n").encode("utf-8"))
            stats["kept_documents"] += 1
            sizes.append(len(text.encode("utf-8")))
            stats["kept_bytes"] += sizes[-1]
            entry["kept_documents"] += 1
            entry["kept_bytes"] += sizes[-1]
            ids.append(doc.id)
            kept_languages.append(language)
            hashes.append(text_hash(text))
            if hasher is not None:
                pending.append(
                    shingles(text, task.dedup.ngram, task.dedup.cjk, task.dedup.cjk_ngram)
                )
                if len(pending) == _SIGNATURE_BATCH:
                    signatures.append(hasher.signatures(pending))
                    pending = []
    if hasher is not None:
        if pending:
            signatures.append(hasher.signatures(pending))
        sig = (
            np.concatenate(signatures)
            if signatures
            else np.empty((0, task.dedup.num_perm), np.uint32)
        )
        np.save(tmp / "signatures.npy", sig)
        np.save(tmp / "band_keys.npy", band_keys(sig, task.bands, task.rows))
    np.save(tmp / "exact.npy", np.array(hashes, dtype=np.uint64))
    np.save(tmp / "sizes.npy", np.array(sizes, dtype=np.int64))
    (tmp / "ids.json").write_text(json.dumps(ids))
    (tmp / "languages.json").write_text(json.dumps(kept_languages))
    stats |= {
        "documents": stats["read_documents"],
        "bytes": stats["read_bytes"],
        "filtered": dict(filtered),
        "languages": languages,
        "read_dropped": drops.to_dict(),
        "redactions": dict(redactions),
    }
    return stats


# -- stage C ----------------------------------------------------------------------------------


@dataclass
class TokenizeTask:
    folder: str
    clean_folder: str
    source: str
    status: np.ndarray  # uint8 per cleaned document: KEEP, EXACT_DUPLICATE, NEAR_DUPLICATE
    duplicate_of: dict[int, str]  # local index -> id of the kept document
    first_index: int  # global index of the task's first cleaned document
    tokenizer: str
    val_fraction: float
    seed: int
    documents_file: str  # "" = do not write
    dropped_file: str


@resumable
def tokenize_kept(task: TokenizeTask, tmp: Path) -> Stats:
    tokenizer = load_tokenizer(task.tokenizer)
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside a text is text, not a boundary
    eos = eos_id(tokenizer)
    dtype = token_dtype(tokenizer.get_vocab_size())
    lengths: list[int] = []
    val: list[bool] = []
    index: list[int] = []
    total_bytes = 0
    # Per language: kept documents, their UTF-8 bytes and text tokens (end-of-text not counted).
    languages: dict[str, dict[str, int]] = {}
    with ExitStack() as files:
        tokens_out = files.enter_context((tmp / "tokens.bin").open("wb"))
        kept_out = _optional_output(files, task.documents_file)
        dropped_out = _optional_output(files, task.dropped_file)
        if dropped_out is not None:
            for line in (Path(task.clean_folder) / "filtered.jsonl").read_text().splitlines():
                dropped_out.write(json.dumps({**json.loads(line), "source": task.source}) + "\n")
        batch: list[tuple[int, dict[str, str]]] = []
        size = 0

        def flush() -> None:
            texts = [d["text"] for _, d in batch]
            encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=False)
            for (local, doc), encoding in zip(batch, encodings, strict=True):
                entry = languages.setdefault(
                    doc["language"], {"documents": 0, "bytes": 0, "tokens": 0}
                )
                entry["documents"] += 1
                entry["bytes"] += len(doc["text"].encode("utf-8"))
                entry["tokens"] += len(encoding.ids)
                ids = np.asarray([*encoding.ids, eos], dtype=dtype)
                tokens_out.write(ids.tobytes())
                lengths.append(len(ids))
                val.append(is_validation(doc["id"], task.seed, task.val_fraction))
                index.append(task.first_index + local)

        for local, doc in enumerate(read_docs(Path(task.clean_folder))):
            status = int(task.status[local])
            if status != KEEP:
                if dropped_out is not None:
                    record = {
                        "id": doc["id"],
                        "source": task.source,
                        "reason": REASONS[status],
                        "language": doc["language"],
                        "duplicate_of": task.duplicate_of[local],
                    }
                    dropped_out.write(json.dumps(record) + "\n")
                continue
            if kept_out is not None:
                record = {
                    "id": doc["id"],
                    "source": task.source,
                    "language": doc["language"],
                    "text": doc["text"],
                }
                kept_out.write(json.dumps(record) + "\n")
            total_bytes += len(doc["text"].encode("utf-8"))
            batch.append((local, doc))
            size += len(doc["text"])
            if size >= _TOKENIZE_BATCH_BYTES:
                flush()
                batch, size = [], 0
        if batch:
            flush()
    for target in (task.documents_file, task.dropped_file):
        if target:
            os.replace(target + ".tmp", target)
    offsets = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
    flags = np.array(val, dtype=bool)
    np.save(tmp / "offsets.npy", offsets)
    np.save(tmp / "val.npy", flags)
    np.save(tmp / "global_index.npy", np.array(index, dtype=np.int64))
    per_doc = np.diff(offsets)
    stats = {
        "documents": len(lengths),
        "bytes": total_bytes,
        "train_documents": int((~flags).sum()),
        "val_documents": int(flags.sum()),
        "train_tokens": int(per_doc[~flags].sum()),
        "val_tokens": int(per_doc[flags].sum()),
        "languages": languages,
    }
    return stats


def _optional_output(files: ExitStack, target: str) -> IO[str] | None:
    """A `.tmp` file beside `target` (renamed when the task is done), or None if not wanted."""
    if not target:
        return None
    return files.enter_context(Path(target + ".tmp").open("w", encoding="utf-8"))
