"""Evaluation task files, their kind told by their content: token shards or text (perplexity),
multiple-choice JSONL, generation JSONL and preference-pair JSONL. Lines that do not parse are
counted, not dropped silently, so a half-broken file cannot pass for a small one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.data.shards import is_shard_folder

Kind = Literal["perplexity", "multiple_choice", "generation", "preference"]

SHAPES = (
    "a token-shard folder made by `loom data tokenize` (perplexity on its val split); "
    'a .txt file or a .jsonl of {"text": str} (perplexity); '
    'a .jsonl of {"context": str, "choices": [str, ...], "answer": int} (multiple choice); '
    'a .jsonl of {"prompt": str, "answer": str} or {"prompt": str, "answers": [str, ...]} '
    "(generation); "
    'a .jsonl of {"prompt", "chosen", "rejected"} (preference pairs: pairwise accuracy)'
)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
TEXT_SUFFIXES = (".txt", ".text", ".md")


@dataclass
class Choice:
    """One multiple-choice question: the context and its candidate continuations."""

    context: str
    choices: list[str]
    answer: int


@dataclass
class Prompt:
    """One generation example: the prompt and the answers that count as right."""

    prompt: str
    answers: list[str]


@dataclass
class Task:
    """A parsed task file; `malformed` holds the 1-based line numbers that were skipped."""

    name: str
    path: Path
    kind: Kind
    shards: bool = False  # perplexity on a token-shard folder (else on `texts`)
    texts: list[str] = field(default_factory=list)
    # (preference pairs: the records, rendered with the model's chat template when scored)
    examples: list[Choice] | list[Prompt] | list[dict[str, Any]] = field(default_factory=list)
    malformed: list[int] = field(default_factory=list)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _shape_of(record: Any) -> Kind | None:
    """Which accepted shape a JSON record has (None: none of them)."""
    if not isinstance(record, dict):
        return None
    if "context" in record or "choices" in record:
        answer = record.get("answer")
        ok = (
            isinstance(record.get("context"), str)
            and _is_str_list(record.get("choices"))
            and isinstance(answer, int)
            and not isinstance(answer, bool)
            and 0 <= answer < len(record["choices"])
        )
        return "multiple_choice" if ok else None
    if "chosen" in record or "rejected" in record:
        # (the answers' forms are checked when the pairs are rendered, as for DPO data)
        return "preference" if {"prompt", "chosen", "rejected"} <= set(record) else None
    if "prompt" in record:
        answers = record.get("answers", [record.get("answer")])
        ok = isinstance(record["prompt"], str) and _is_str_list(answers)
        return "generation" if ok else None
    if isinstance(record.get("text"), str):
        return "perplexity"
    return None


def _example(kind: Kind, record: dict[str, Any]) -> Choice | Prompt | str | dict[str, Any]:
    if kind == "preference":
        return record
    if kind == "multiple_choice":
        return Choice(record["context"], list(record["choices"]), record["answer"])
    if kind == "generation":
        return Prompt(record["prompt"], list(record.get("answers", [record.get("answer")])))
    return str(record["text"])


def _read_jsonl(path: Path, name: str) -> Task:
    records: list[tuple[int, Any]] = []
    malformed: list[int] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LoomError(f"task {path} cannot be read: {e}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError:
            malformed.append(number)
    # The first record of a known shape decides the kind of the whole file.
    kind = next((k for _, r in records if (k := _shape_of(r)) is not None), None)
    if kind is None:
        raise LoomError(f"task {path} holds no example of a known shape; accepted: {SHAPES}")
    items: list[Any] = []
    for number, record in records:
        if _shape_of(record) == kind:
            items.append(_example(kind, record))
        else:
            malformed.append(number)
    malformed.sort()
    if malformed:
        shown = ", ".join(map(str, malformed[:20])) + (" ..." if len(malformed) > 20 else "")
        logger.warning(
            "task %s: skipped %d malformed line(s) (not JSON or not a %s example): line %s",
            path,
            len(malformed),
            kind.replace("_", " "),
            shown,
        )
    task = Task(name, path, kind, malformed=malformed)
    if kind == "perplexity":
        task.texts = items
    else:
        task.examples = items
    return task


def load_task(path: str | Path, name: str | None = None) -> Task:
    """Parse one task path; anything empty or of an unknown shape is a LoomError."""
    p = Path(path)
    name = name or p.name
    if not p.exists():
        raise LoomError(f"task {p} does not exist; accepted: {SHAPES}")
    if p.is_dir():
        if not is_shard_folder(p):
            raise LoomError(
                f"task {p} is a folder but not a token-shard folder; accepted: {SHAPES}"
            )
        return Task(name, p, "perplexity", shards=True)
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _read_jsonl(p, name)
    if suffix in TEXT_SUFFIXES:
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise LoomError(f"task {p} cannot be read as UTF-8 text: {e}") from None
        if not text.strip():
            raise LoomError(f"task {p} is empty; accepted: {SHAPES}")
        return Task(name, p, "perplexity", texts=[text])
    raise LoomError(f"task {p}: unknown file type {p.suffix or '(none)'}; accepted: {SHAPES}")
