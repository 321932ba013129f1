"""Input files to documents, streamed, with every skipped record counted.

Formats by suffix (after an optional `.gz` or `.zst`): `.jsonl`/`.ndjson` (one record per
line), `.json` (an array of records, read whole), `.parquet` (read in row batches), anything
else is UTF-8 text: one document per file, per line, or per blank-line-separated paragraph.
Documents without an `id` field are named `<name>:<line or row>` (`<name>` alone for a whole
file), where `<name>` is the file's path relative to the inputs' common folder, so ids do not
change when the corpus moves.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from loom.core.errors import LoomError

TextUnit = Literal["file", "line", "paragraph"]
_BATCH_ROWS = 4096


@dataclass
class Document:
    id: str
    text: str


@dataclass
class DropReport:
    """Records skipped while reading, by reason and by file (reported in the manifest)."""

    by_reason: Counter[str] = field(default_factory=Counter)
    by_file: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def drop(self, file: Path | str, reason: str) -> None:
        self.by_reason[reason] += 1
        self.by_file[str(file)][reason] += 1

    @property
    def total(self) -> int:
        return sum(self.by_reason.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "total": self.total,
            "by_reason": dict(self.by_reason),
            "by_file": {f: dict(c) for f, c in sorted(self.by_file.items())},
        }


def expand_inputs(patterns: Sequence[str], what: str = "--input") -> list[Path]:
    """Sorted, de-duplicated files matching the globs; a glob that matches nothing is an error."""
    files: set[Path] = set()
    for pattern in patterns:
        if Path(pattern).is_dir():
            raise LoomError(f"{what} {pattern} is a folder; give a glob such as {pattern}/**/*.txt")
        matches = [Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file()]
        if not matches:
            raise LoomError(f"{what} {pattern} matches no files")
        files.update(matches)
    return sorted(files)


def relative_names(files: Sequence[Path]) -> dict[Path, str]:
    """Each file's path relative to the folder that holds them all."""
    if not files:
        return {}
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
    return {p: p.resolve().relative_to(root).as_posix() for p in files}


def read_documents(
    files: Sequence[Path], drops: DropReport, text_field: str = "text"
) -> Iterator[Document]:
    """Documents of several files, named by their relative paths."""
    names = relative_names(files)
    for path in files:
        yield from read_file(path, names[path], drops, text_field)


def read_file(
    path: Path,
    name: str,
    drops: DropReport,
    text_field: str = "text",
    text_unit: TextUnit = "file",
    strict: bool = False,
) -> Iterator[Document]:
    """Every document of one file. A file that breaks mid-way keeps what was read before and
    counts one `unreadable` drop, unless `strict`, which raises instead."""
    fmt = _format(path)
    try:
        if fmt == "parquet":
            yield from _parquet(path, name, drops, text_field, strict)
        elif fmt == "json":
            with _open(path) as raw:
                records = json.load(raw)
            if not isinstance(records, list):
                raise ValueError("a .json file must hold an array of records")
            for i, record in enumerate(records, start=1):
                doc = _record(record, f"{name}:{i}", text_field, path, drops, strict)
                if doc is not None:
                    yield doc
        elif fmt == "jsonl":
            with _open(path) as raw:
                for i, line in enumerate(raw, start=1):
                    if line.strip():
                        yield from _jsonl_line(line, f"{name}:{i}", text_field, path, drops, strict)
        else:
            yield from _text(path, name, text_unit, drops, strict)
    except LoomError:
        raise
    except Exception as e:  # gzip, zstandard, json and pyarrow each raise their own types
        _skip(path, f"unreadable: {type(e).__name__}", drops, strict, str(e))


def _format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".zst"):
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}.get(
        last, "text"
    )


def _open(path: Path) -> IO[bytes]:
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(path.open("rb")))
    return path.open("rb")


def _skip(path: Path, reason: str, drops: DropReport, strict: bool, detail: str = "") -> None:
    if strict:
        raise LoomError(f"{path}: {reason}{f' ({detail})' if detail else ''} (strict = true)")
    drops.drop(path, reason)


def _jsonl_line(
    line: bytes, doc_id: str, text_field: str, path: Path, drops: DropReport, strict: bool
) -> Iterator[Document]:
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        _skip(path, "not UTF-8", drops, strict, doc_id)
        return
    except json.JSONDecodeError:
        _skip(path, "malformed JSON", drops, strict, doc_id)
        return
    doc = _record(record, doc_id, text_field, path, drops, strict)
    if doc is not None:
        yield doc


def _record(
    record: Any, doc_id: str, text_field: str, path: Path, drops: DropReport, strict: bool
) -> Document | None:
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        _skip(path, f"no string field {text_field!r}", drops, strict, doc_id)
        return None
    if not text.strip():
        _skip(path, "empty", drops, strict, doc_id)
        return None
    given = record.get("id")
    return Document(str(given) if given is not None else doc_id, text)


def _text(
    path: Path, name: str, unit: TextUnit, drops: DropReport, strict: bool
) -> Iterator[Document]:
    with _open(path) as raw:
        if unit == "file":
            try:
                text = raw.read().decode("utf-8")
            except UnicodeDecodeError:
                _skip(path, "not UTF-8", drops, strict)
                return
            if text.strip():
                yield Document(name, text)
            else:
                _skip(path, "empty", drops, strict)
            return
        paragraph: list[str] = []
        start = 0
        for i, line_bytes in enumerate(raw, start=1):
            try:
                line = line_bytes.decode("utf-8")
            except UnicodeDecodeError:
                _skip(path, "not UTF-8", drops, strict, f"line {i}")
                continue
            if unit == "line":
                if line.strip():
                    yield Document(f"{name}:{i}", line.rstrip("\n"))
                continue
            if line.strip():
                start = start or i
                paragraph.append(line)
            elif paragraph:
                yield Document(f"{name}:{start}", "".join(paragraph).rstrip("\n"))
                paragraph, start = [], 0
        if paragraph:
            yield Document(f"{name}:{start}", "".join(paragraph).rstrip("\n"))


def _parquet(
    path: Path, name: str, drops: DropReport, text_field: str, strict: bool
) -> Iterator[Document]:
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path)
    columns = [c for c in (text_field, "id") if c in table.schema_arrow.names]
    if text_field not in columns:
        _skip(path, f"no column {text_field!r}", drops, strict)
        return
    row = 0
    for batch in table.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            row += 1
            record = {k: v[i] for k, v in data.items()}
            doc = _record(record, f"{name}:{row}", text_field, path, drops, strict)
            if doc is not None:
                yield doc
