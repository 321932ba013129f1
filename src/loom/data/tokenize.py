"""`loom data tokenize`: text/JSONL files -> train/val token shards + manifest."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.run_files import MANIFEST, Manifest
from loom.core.tokenizer import eos_id, load_tokenizer, save_tokenizer, tokenizer_hash
from loom.data.readers import Document, DropReport, expand_inputs, read_documents
from loom.data.shards import (
    FORMAT,
    ShardWriter,
    is_shard_folder,
    replace_folder,
    token_dtype,
    write_manifest,
)

BATCH_BYTES = 8 << 20  # documents are tokenized in batches of about this much text


@dataclass
class TokenizeOptions:
    inputs: Sequence[str]
    tokenizer: str
    out: str
    val_fraction: float = 0.05
    seed: int = 0
    shard_tokens: int = 1 << 26
    text_field: str = "text"
    overwrite: bool = False


def is_validation(doc_id: str, seed: int, val_fraction: float) -> bool:
    """Split by document with a seeded hash of its id: stable whatever the input order."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def warn_on_empty_split(manifest: Manifest, option: str) -> None:
    """An empty split is legal but surprising: say so, and what to change (`option`)."""
    splits, fraction = manifest["splits"], manifest["val_fraction"]
    documents = splits["train"]["documents"] + splits["val"]["documents"]
    if fraction > 0 and splits["val"]["documents"] == 0:
        logger.warning(
            "no document fell into the validation split (%s=%g of %d document(s), chosen by a "
            "hash of each id): training on this folder reports no val_loss; raise %s or add "
            "documents",
            option,
            fraction,
            documents,
            option,
        )
    if splits["train"]["documents"] == 0:
        logger.warning(
            "all %d document(s) fell into the validation split: training on this folder has "
            "nothing to train on; lower %s or add documents",
            documents,
            option,
        )


def tokenize_to_shards(opts: TokenizeOptions) -> Manifest:
    """Run the job; returns the manifest it wrote."""
    if not 0 <= opts.val_fraction < 1:
        raise LoomError(f"--val-fraction {opts.val_fraction} must be in [0, 1)")
    if opts.shard_tokens <= 0:
        raise LoomError(f"--shard-tokens {opts.shard_tokens} must be positive")
    files = expand_inputs(opts.inputs)
    tokenizer = load_tokenizer(opts.tokenizer)
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" inside a text is text, not a boundary
    final = Path(opts.out)
    if final.exists() and any(final.iterdir()):
        if not is_shard_folder(final):
            raise LoomError(
                f"--out {final} is a non-empty folder that holds no Loom token shards; "
                "choose a new or empty folder"
            )
        if not opts.overwrite:
            raise LoomError(f"{final} already holds token shards; pass --overwrite to replace them")
    # Build beside the target and swap at the end: a failure leaves the old shards intact.
    out = final.with_name(final.name + ".partial")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_tokenizer(tokenizer, out / "tokenizer")

    started = time.perf_counter()
    vocab_size = tokenizer.get_vocab_size()
    eos = eos_id(tokenizer)
    dtype = token_dtype(vocab_size)
    writers = {s: ShardWriter(out, s, dtype, opts.shard_tokens) for s in ("train", "val")}
    drops = DropReport()
    counts = {s: {"documents": 0, "tokens": 0} for s in writers}
    read_bytes = 0
    for batch in _batches(read_documents(files, drops, opts.text_field)):
        read_bytes += sum(len(d.text.encode("utf-8")) for d in batch)
        encodings = tokenizer.encode_batch_fast([d.text for d in batch], add_special_tokens=False)
        for doc, encoding in zip(batch, encodings, strict=True):
            ids = np.asarray([*encoding.ids, eos], dtype=np.int64)
            split = "val" if is_validation(doc.id, opts.seed, opts.val_fraction) else "train"
            writers[split].add(ids)
            counts[split]["documents"] += 1
            counts[split]["tokens"] += len(ids)

    kept = sum(c["documents"] for c in counts.values())
    if kept == 0:
        raise LoomError(
            f"no usable documents in {len(files)} input file(s) "
            f"(dropped: {dict(drops.by_reason) or 'none'})"
        )
    manifest: Manifest = {
        "format": FORMAT,
        "created_by": "loom data tokenize",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "inputs": {"patterns": list(opts.inputs), "files": len(files), "bytes": read_bytes},
        "tokenizer": {
            "path": "tokenizer/tokenizer.json",
            "hash": tokenizer_hash(tokenizer),
            "vocab_size": vocab_size,
            "eos_id": eos,
        },
        "dtype": dtype.name,
        "seed": opts.seed,
        "val_fraction": opts.val_fraction,
        "documents": {"read": kept + drops.total, "kept": kept, "dropped": drops.total},
        "dropped": drops.to_dict(),
        "tokens": sum(c["tokens"] for c in counts.values()),
        "splits": {s: {**counts[s], "shards": w.close()} for s, w in writers.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_manifest(out, manifest)
    replace_folder(out, final)
    out = final
    logger.info(
        "tokenized %d documents (%d dropped) into %d train + %d val tokens in %s",
        kept,
        drops.total,
        counts["train"]["tokens"],
        counts["val"]["tokens"],
        out,
    )
    for reason, n in drops.by_reason.items():
        logger.warning("dropped %d record(s): %s (per file in %s)", n, reason, out / MANIFEST)
    warn_on_empty_split(manifest, "--val-fraction")
    return manifest


def _batches(docs: Iterator[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in docs:
        batch.append(doc)
        size += len(doc.text)
        if size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch
