"""Token shards: packed token ids with an index of document starts, described by a manifest.

Layout of a prepared folder:

    manifest.json                  counts, drops, tokenizer identity, shard list (written last)
    tokenizer/tokenizer.json       the tokenizer that produced the ids
    <split>/shard-NNNNN.bin        raw little-endian token ids (uint16 or uint32)
    <split>/shard-NNNNN.docs.npy   int64 offsets where each document starts inside the shard

Documents are stored whole, each followed by the end-of-text token. The reader checks every
shard against the manifest (size, token count) before training starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loom.core.errors import LoomError
from loom.core.run_files import MANIFEST, Manifest
from loom.core.tokenizer import load_tokenizer, tokenizer_hash

FORMAT = "loom-token-shards/1"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents to one split, closing a shard once it holds `shard_tokens` tokens."""

    def __init__(
        self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int, first: int = 0
    ) -> None:
        self.dir = out_dir / split
        self.first = first  # number of the first shard: writers of consecutive runs of shards
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split = split
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, tokens: np.ndarray) -> None:
        self._pending.append(tokens.astype(self.dtype, copy=False))
        self._pending_tokens += len(tokens)
        if self._pending_tokens >= self.shard_tokens:
            self._flush()

    def close(self) -> list[dict[str, Any]]:
        if self._pending:
            self._flush()
        return self.shards

    def _flush(self) -> None:
        name = f"shard-{self.first + len(self.shards):05d}"
        tokens = np.concatenate(self._pending)
        starts = np.cumsum([0] + [len(d) for d in self._pending[:-1]], dtype=np.int64)
        data = tokens.astype(tokens.dtype.newbyteorder("<"), copy=False).tobytes()
        _write_atomic(self.dir / f"{name}.bin", data)
        index_path = self.dir / f"{name}.docs.npy"
        np.save(index_path.with_suffix(".tmp.npy"), starts)
        os.replace(index_path.with_suffix(".tmp.npy"), index_path)
        self.shards.append(
            {
                "path": f"{self.split}/{name}.bin",
                "index": f"{self.split}/{name}.docs.npy",
                "tokens": len(tokens),
                "documents": len(self._pending),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )
        self._pending, self._pending_tokens = [], 0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_manifest(out_dir: Path, manifest: Manifest) -> None:
    """Written last and atomically: a folder with a manifest is a complete one."""
    _write_atomic(out_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def is_shard_folder(path: Path) -> bool:
    """True when `path` holds a Loom token-shard manifest."""
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def replace_folder(new: Path, target: Path) -> None:
    """Put the finished folder `new` in place of `target`; the old manifest goes first, so no
    moment exists at which a manifest lists shards that are not there."""
    if target.exists():
        (target / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(target)
    os.replace(new, target)


@dataclass
class SplitTokens:
    """One split's shards, memory-mapped and addressable as one concatenated token stream."""

    shards: list[np.memmap]
    offsets: np.ndarray  # offsets[i] = first global position of shard i; offsets[-1] = total

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def window(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the stream, crossing shard edges if needed."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            local = start + filled - int(self.offsets[shard])
            piece = self.shards[shard][local : local + length - filled]
            out[filled : filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out


class TokenDataset:
    """A prepared folder, checked against its manifest when opened."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.dtype = np.dtype(self.manifest["dtype"])
        self._check_tokenizer()
        self.splits = {
            name: self._open_split(name) for name in SPLITS if name in self.manifest["splits"]
        }

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def tokenizer_hash(self) -> str:
        return str(self.manifest["tokenizer"]["hash"])

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest["tokenizer"]["path"]

    @property
    def fingerprint(self) -> str:
        """Identity of the training data: the checksums of its shards."""
        shards = self.manifest["splits"].get("train", {}).get("shards", [])
        digest = hashlib.sha256(json.dumps([s["sha256"] for s in shards]).encode())
        return digest.hexdigest()[:16]

    def _check_tokenizer(self) -> None:
        tokenizer = load_tokenizer(self.tokenizer_path)
        if (
            tokenizer_hash(tokenizer) != self.tokenizer_hash
            or tokenizer.get_vocab_size() != self.vocab_size
        ):
            raise LoomError(
                f"{self.tokenizer_path} does not match {self.path / MANIFEST} (hash or vocabulary "
                "size differ): the folder was altered; prepare it again"
            )

    def split(self, name: str) -> SplitTokens:
        if name not in self.splits or self.splits[name].num_tokens == 0:
            raise LoomError(f"{self.path} has no {name!r} tokens (see its {MANIFEST})")
        return self.splits[name]

    def _open_split(self, name: str) -> SplitTokens:
        maps: list[np.memmap] = []
        lengths = [0]
        for shard in self.manifest["splits"][name]["shards"]:
            file = self.path / shard["path"]
            expected = int(shard["tokens"]) * self.dtype.itemsize
            if not file.is_file():
                raise LoomError(
                    f"shard {file} listed in {MANIFEST} is missing; re-run `loom data tokenize`"
                )
            size = file.stat().st_size
            if size != expected:
                raise LoomError(
                    f"shard {file} is {size} bytes but {MANIFEST} says {expected} "
                    f"({shard['tokens']} tokens): it is truncated or corrupt; "
                    "re-run `loom data tokenize`"
                )
            if size:
                maps.append(np.memmap(file, dtype=self.dtype.newbyteorder("<"), mode="r"))
                lengths.append(int(shard["tokens"]))
        return SplitTokens(maps, np.cumsum(lengths, dtype=np.int64))


def read_manifest(path: Path) -> Manifest:
    file = path / MANIFEST
    if not path.is_dir():
        raise LoomError(f"data.path {path} does not exist; create it with `loom data tokenize`")
    if not file.is_file():
        raise LoomError(
            f"data.path {path} holds no token shards ({MANIFEST} missing); "
            "create them with `loom data tokenize --input ... --tokenizer ... --out "
            f"{path}`"
        )
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoomError(f"{file} is not valid JSON ({e}); re-run `loom data tokenize`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LoomError(f"{file} is not a Loom token-shard manifest (expected format {FORMAT})")
    try:
        if np.dtype(manifest["dtype"]) not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise ValueError(f"dtype {manifest['dtype']} is not uint16 or uint32")
        tokenizer = manifest["tokenizer"]
        str(tokenizer["path"]), str(tokenizer["hash"]), int(tokenizer["vocab_size"])
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                if int(shard["tokens"]) < 0 or not str(shard["path"]) or not str(shard["sha256"]):
                    raise ValueError(f"bad shard entry {shard}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise LoomError(
            f"{file} is malformed ({type(e).__name__}: {e}); prepare the data again"
        ) from None
    return manifest
