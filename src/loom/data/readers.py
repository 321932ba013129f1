"""Input files to documents: globs expanded, text and JSONL read, every dropped record counted."""

from __future__ import annotations

import glob
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loom.errors import LoomError


@dataclass
class Document:
    id: str
    text: str


@dataclass
class DropReport:
    """Records skipped while reading, by reason and by file (reported in the manifest)."""

    by_reason: Counter[str] = field(default_factory=Counter)
    by_file: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def drop(self, file: Path, reason: str) -> None:
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


def expand_inputs(patterns: Sequence[str]) -> list[Path]:
    """Sorted, de-duplicated files matching the globs; a glob that matches nothing is an error."""
    files: set[Path] = set()
    for pattern in patterns:
        if Path(pattern).is_dir():
            raise LoomError(
                f"--input {pattern} is a folder; give a glob such as {pattern}/**/*.txt"
            )
        matches = [Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file()]
        if not matches:
            raise LoomError(f"--input {pattern} matches no files")
        files.update(matches)
    return sorted(files)


def read_documents(
    files: Sequence[Path], drops: DropReport, text_field: str = "text"
) -> Iterator[Document]:
    """`.jsonl` files give one document per line (its `text_field`); other files are one each.

    Documents without an `id` are named by their file's path relative to the inputs' common
    folder (plus the line for JSONL), so ids, and the split derived from them, do not change
    when the corpus moves.
    """
    names = relative_names(files)
    for path in files:
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path, names[path], drops, text_field)
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            drops.drop(path, "not UTF-8")
            continue
        except OSError as e:
            drops.drop(path, f"unreadable: {e.strerror}")
            continue
        if not text.strip():
            drops.drop(path, "empty")
            continue
        yield Document(names[path], text)


def relative_names(files: Sequence[Path]) -> dict[Path, str]:
    """Each file's path relative to the folder that holds them all."""
    if not files:
        return {}
    root = Path(os.path.commonpath([str(p.resolve().parent) for p in files]))
    return {p: p.resolve().relative_to(root).as_posix() for p in files}


def _read_jsonl(path: Path, name: str, drops: DropReport, text_field: str) -> Iterator[Document]:
    try:
        handle = path.open("rb")
    except OSError as e:
        drops.drop(path, f"unreadable: {e.strerror}")
        return
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                drops.drop(path, "not UTF-8")
                continue
            except json.JSONDecodeError:
                drops.drop(path, "malformed JSON")
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                drops.drop(path, f"no string field {text_field!r}")
                continue
            if not text.strip():
                drops.drop(path, "empty")
                continue
            doc_id = record.get("id")
            yield Document(str(doc_id) if doc_id is not None else f"{name}:{line_no}", text)
