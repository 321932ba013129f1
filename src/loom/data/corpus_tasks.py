"""The whole-corpus steps of `loom data prepare` as executor tasks (tasks.py holds the per-file
ones): near-duplicate search sharded by band, tokenizer training, and shard writing.

The driver keeps what needs every document at once but only a few bytes of each: the exact
hashes, the union of the near-duplicate pairs (union-find), the kept/dropped status, and the
shuffle table of packing. The heavy parts (band keys, signatures, text, tokens) are read by the
tasks from the task folders of earlier stages, memory-mapped, which assumes that every worker
sees the same filesystem (see executor.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loom.core.tokenizer import save_tokenizer, train_bpe
from loom.data.dedup import DedupConfig, near_pairs
from loom.data.hashing import mix64
from loom.data.shards import ShardWriter
from loom.data.tasks import KEEP, read_docs

Result = dict[str, Any]


def sample_unit(index: int | np.ndarray, seed: int) -> np.ndarray:
    """A seeded uniform number in [0, 1) per document index."""
    return (
        mix64(np.asarray(index, dtype=np.uint64) ^ np.uint64(seed * 0x2545F491 + 0x9E37)).astype(
            np.float64
        )
        / 2.0**64
    )


class Signatures:
    """Signature rows by global document index, read from each cleaned folder on demand."""

    def __init__(self, folders: list[str], first_index: list[int]) -> None:
        self.maps = [np.load(Path(f) / "signatures.npy", mmap_mode="r") for f in folders]
        self.first_index = np.asarray(first_index, dtype=np.int64)

    def rows(self, index: np.ndarray) -> np.ndarray:
        task = np.searchsorted(self.first_index, index, side="right") - 1
        out = np.empty((len(index), self.maps[0].shape[1] if self.maps else 0), dtype=np.uint32)
        for t in np.unique(task):
            chosen = task == t
            out[chosen] = self.maps[t][index[chosen] - self.first_index[t]]
        return out


# -- near-duplicate search, one task per group of (band, key range) slots -----------------------


@dataclass
class NearShardTask:
    folders: list[str]  # cleaned folders in input order, each with band_keys.npy, signatures.npy
    first_index: list[int]  # global index of each folder's first document
    alive: str  # .npy of bools, one per document: takes part (not filtered, not an exact copy)
    slots: list[tuple[int, int, int]]  # (band, part, parts): keys of `band` in part `part`
    dedup: DedupConfig


def near_shards(bands: int, shards: int) -> list[list[tuple[int, int, int]]]:
    """`shards` groups of slots covering every band once. With more shards than bands, each band
    is cut into key ranges (a bucket of equal keys stays whole), so a shard's memory is its
    share of the band keys, however few the bands."""
    parts = -(-shards // bands)
    slots = [(band, part, parts) for band in range(bands) for part in range(parts)]
    return [slots[i * len(slots) // shards : (i + 1) * len(slots) // shards] for i in range(shards)]


def near_dedup_shard(task: NearShardTask) -> Result:
    """Verified candidate pairs in this shard's slots, as compact (i, j) rows of global indices."""
    alive = np.load(task.alive, mmap_mode="r")
    total = len(alive)
    maps = [np.load(Path(f) / "band_keys.npy", mmap_mode="r") for f in task.folders]
    columns, entries = [], 0
    for band, part, parts in task.slots:
        keys, index = [], []
        for start, keymap in zip(task.first_index, maps, strict=True):
            key = np.asarray(keymap[:, band])  # one contiguous read: the file is column-major
            chosen = np.asarray(alive[start : start + len(key)]) & (key != 0)
            if parts > 1:
                high = (key >> np.uint64(32)) * np.uint64(parts) >> np.uint64(32)
                chosen &= high == np.uint64(part)
            keys.append(key[chosen])
            index.append(np.flatnonzero(chosen) + start)
        if keys:
            columns.append((np.concatenate(keys), np.concatenate(index)))
            entries += len(columns[-1][0])
    pairs = near_pairs(columns, Signatures(task.folders, task.first_index).rows, task.dedup)
    bands = max(len({s[0] for s in task.slots}), 1)
    return {
        "documents": entries // bands,
        "bytes": 0,
        "pairs": pairs.astype(np.uint32 if total < 2**32 else np.int64),
    }


# -- tokenizer training, one task ------------------------------------------------------------


@dataclass
class TokenizerTask:
    folders: list[str]
    first_index: list[int]
    status: str  # .npy of uint8 per document; KEEP ones are sampled
    fraction: float  # of the kept documents, chosen by sample_unit(index, seed)
    seed: int
    vocab_size: int
    special_tokens: list[str]
    target: str  # folder for tokenizer.json


def train_tokenizer(task: TokenizerTask) -> Result:
    """Train the BPE tokenizer on a seeded sample of the kept documents and save it."""
    status = np.load(task.status, mmap_mode="r")
    count = {"documents": 0, "bytes": 0}

    def sample() -> Any:
        for folder, start in zip(task.folders, task.first_index, strict=True):
            for local, doc in enumerate(read_docs(Path(folder))):
                g = start + local
                if status[g] == KEEP and sample_unit(g, task.seed) < task.fraction:
                    count["documents"] += 1
                    count["bytes"] += len(doc["text"].encode("utf-8"))
                    yield doc["text"]

    tokenizer = train_bpe(sample(), task.vocab_size, task.special_tokens)
    save_tokenizer(tokenizer, Path(task.target))
    return {**count, "vocab_size": tokenizer.get_vocab_size()}


# -- shard writing, one task per run of consecutive shards -------------------------------------


@dataclass
class PackTask:
    out: str
    split: str
    order: str  # .npy [documents, 2]: (token folder number, document in it) in shuffled order
    begin: int  # rows [begin, end) of `order`, which fill shards first_shard, first_shard + 1, ...
    end: int
    first_shard: int
    token_folders: list[str]
    dtype: str
    shard_tokens: int


def shard_bounds(lengths: np.ndarray, shard_tokens: int) -> list[int]:
    """End row of each shard when documents of these lengths are added in order and a shard
    closes once it holds ≥ shard_tokens tokens (ShardWriter's rule)."""
    total = np.cumsum(lengths, dtype=np.int64)
    ends, base, start = [], 0, 0
    while start < len(total):
        end = min(int(np.searchsorted(total, base + shard_tokens, side="left")) + 1, len(total))
        ends.append(end)
        base, start = int(total[end - 1]), end
    return ends


def write_shards(task: PackTask) -> Result:
    """Write shards first_shard, ... of one split: the same bytes as writing the whole split
    in one pass, because the rows start at a shard boundary."""
    rows = np.asarray(np.load(task.order, mmap_mode="r")[task.begin : task.end])
    dtype = np.dtype(task.dtype)
    maps: dict[int, np.ndarray] = {}
    offsets: dict[int, np.ndarray] = {}
    for t in np.unique(rows[:, 0]).tolist():
        folder = Path(task.token_folders[t])
        offsets[t] = np.load(folder / "offsets.npy")
        maps[t] = np.memmap(folder / "tokens.bin", dtype=dtype, mode="r")
    writer = ShardWriter(Path(task.out), task.split, dtype, task.shard_tokens, task.first_shard)
    tokens = 0
    for t, local in rows.tolist():
        begin, end = offsets[t][local], offsets[t][local + 1]
        writer.add(np.asarray(maps[t][begin:end]))
        tokens += int(end - begin)
    return {"documents": len(rows), "bytes": tokens * dtype.itemsize, "shards": writer.close()}
