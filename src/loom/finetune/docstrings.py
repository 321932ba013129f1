"""A small real instruction set, offline everywhere: questions about Python standard-library
functions, answered by their own docstrings (for the CPU LoRA fine-tuning demo)."""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import random
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from loom.core.errors import LoomError
from loom.core.log import logger

# Pure-Python or always-built modules only, so every CPython has them.
DEFAULT_MODULES: tuple[str, ...] = (
    "json", "os.path", "textwrap", "string", "shutil", "itertools", "functools", "collections",
    "re", "math", "statistics", "random", "pathlib", "datetime", "heapq", "bisect", "fnmatch",
    "glob", "base64", "hashlib", "csv", "difflib", "urllib.parse", "zipfile", "tarfile", "copy",
    "operator", "uuid", "secrets", "calendar", "html", "shlex", "ipaddress", "fractions",
    "contextlib", "tempfile", "pprint", "enum", "dataclasses", "argparse", "logging", "abc",
)  # fmt: skip
TEMPLATES = (
    "What does `{name}` do in Python?",
    "Explain the Python {kind} `{name}`.",
    "In Python, what is `{name}` for?",
    "What is the purpose of the {kind} `{name}` in Python?",
    "Briefly describe `{name}` from the Python standard library.",
)
MIN_ANSWER_CHARS = 20
MAX_SIGNATURE_CHARS = 60
# A docstring that opens with its own signature, e.g. "chain(*iterables) --> chain object".
_SIGNATURE_LINE = re.compile(r"^[\w.]+(\(.*?\))(?=\s*(-+>|$))")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclass(frozen=True)
class DocstringDataset:
    """Where the split files went, and how many examples each holds."""

    train_path: Path
    val_path: Path
    counts: dict[str, int]


def _public_objects(module: str) -> Iterator[tuple[str, str, object]]:
    """(qualified name, kind, object) for public routines and classes defined in `module`, and
    the public methods those classes define themselves; re-exports are skipped."""
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise LoomError(f"cannot import module {module!r} for the docstring dataset: {e}") from e
    own = [
        (name, obj)
        for name, obj in vars(mod).items()
        if not name.startswith("_") and getattr(obj, "__module__", None) == mod.__name__
    ]
    # Functions before classes: of two identical docstrings the module-level one is kept.
    for name, obj in sorted(own, key=lambda item: (inspect.isclass(item[1]), item[0])):
        if inspect.isclass(obj):
            yield f"{module}.{name}", "class", obj
            for attr in sorted(vars(obj)):
                member = getattr(obj, attr, None)
                if not attr.startswith("_") and inspect.isroutine(member):
                    yield f"{module}.{name}.{attr}", "method", member
        elif inspect.isroutine(obj):
            yield f"{module}.{name}", "function", obj


# Stands in for defaults whose repr is long or holds a memory address (differs run to run).
_ELIDED = type("Elided", (), {"__repr__": lambda self: "..."})()


def _signature(obj: object) -> str | None:
    """A short call signature without `self` or annotations, elided past MAX_SIGNATURE_CHARS;
    None where inspect cannot tell (many C functions)."""
    try:
        params = list(inspect.signature(obj).parameters.values())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    if params and params[0].name in ("self", "cls"):
        params = params[1:]
    plain = [
        p.replace(annotation=p.empty, default=_ELIDED)
        if p.default is not p.empty and (" at 0x" in repr(p.default) or len(repr(p.default)) > 20)
        else p.replace(annotation=p.empty)
        for p in params
    ]
    text = str(inspect.Signature(plain))
    for keep in range(len(plain) - 1, 0, -1):
        if len(text) <= MAX_SIGNATURE_CHARS:
            break
        text = str(inspect.Signature(plain[:keep]))[:-1] + ", ...)"
    return text


def _description(doc: str, max_chars: int) -> tuple[str, str | None]:
    """The docstring's first real paragraph on one line, cut at a sentence end within
    max_chars, and the parameters of a signature line it opened with, if any."""
    lines = [line.strip() for line in doc.strip().splitlines()]
    doc_signature = None
    while lines and (not lines[0] or _SIGNATURE_LINE.match(lines[0])):
        if lines[0] and doc_signature is None:
            doc_signature = _SIGNATURE_LINE.match(lines[0]).group(1)  # type: ignore[union-attr]
        # "od.clear() -> None.  Remove all items from od." keeps the text after the signature.
        lines[:1] = re.split(r"(?<=\.)\s{2,}", lines[0], maxsplit=1)[1:]
    text = " ".join(" ".join(itertools.takewhile(bool, lines)).split()).replace("``", "`")
    if len(text) > max_chars:
        ends = [m.end() for m in _SENTENCE_END.finditer(text) if m.end() <= max_chars]
        text = text[: ends[-1]] if ends else text[: max_chars - 1].rstrip() + "…"
    return text, doc_signature


def _records(modules: Sequence[str], seed: int, max_chars: int) -> tuple[list[dict], int, int]:
    """One chat record per documented object, with the short and duplicate answers counted."""
    records: list[dict] = []
    seen: set[str] = set()
    dropped_short = duplicates = 0
    for module in modules:
        for name, kind, obj in _public_objects(module):
            own_doc = getattr(obj, "__doc__", None)  # unlike getdoc, not inherited from a base
            if not isinstance(own_doc, str) or not own_doc.strip():
                continue
            text, doc_signature = _description(inspect.getdoc(obj) or "", max_chars)
            if len(text) < MIN_ANSWER_CHARS:
                dropped_short += 1
                continue
            if text in seen:  # aliases such as random.randint and random.Random.randint
                duplicates += 1
                continue
            seen.add(text)
            sig = _signature(obj) or doc_signature
            answer = f"`{name}{sig}`: {text}" if sig else text
            template = random.Random(f"{seed}:{name}").choice(TEMPLATES)
            question = template.format(name=name, kind=kind)
            turns = [("user", question), ("assistant", answer)]
            records.append({"messages": [{"role": r, "content": c} for r, c in turns]})
    return records, dropped_short, duplicates


def build_docstring_dataset(
    out_dir: Path,
    *,
    modules: Sequence[str] = DEFAULT_MODULES,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_answer_chars: int = 300,
) -> DocstringDataset:
    """Write train.jsonl, val.jsonl and dataset.json to out_dir; the split is seeded and by
    function (one record per function), so no function is in both files."""
    if not 0 <= val_fraction < 1:
        raise LoomError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_answer_chars < MIN_ANSWER_CHARS:
        raise LoomError(f"max_answer_chars must be at least {MIN_ANSWER_CHARS}")
    records, dropped_short, duplicates = _records(modules, seed, max_answer_chars)
    if not records:
        raise LoomError(f"no documented public functions found in {list(modules)}")
    random.Random(seed).shuffle(records)
    n_val = round(len(records) * val_fraction)
    if val_fraction > 0 and len(records) > 1:
        n_val = min(max(n_val, 1), len(records) - 1)
    splits = {"val": records[:n_val], "train": records[n_val:]}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        lines = (json.dumps(record, ensure_ascii=False) + "\n" for record in rows)
        (out_dir / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    counts = {"train": len(splits["train"]), "val": n_val}
    summary = {**counts, "modules": list(modules), "python": sys.version}
    summary |= {"dropped_short": dropped_short, "duplicates": duplicates}
    (out_dir / "dataset.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("docstring dataset: %d train, %d val in %s", counts["train"], n_val, out_dir)
    return DocstringDataset(out_dir / "train.jsonl", out_dir / "val.jsonl", counts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="folder for the JSONL files")
    parser.add_argument("--seed", type=int, default=0, help="question phrasing and split seed")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="share held out")
    args = parser.parse_args(argv)
    try:
        ds = build_docstring_dataset(args.out, seed=args.seed, val_fraction=args.val_fraction)
    except LoomError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"train: {ds.train_path} ({ds.counts['train']} examples)")
    print(f"val: {ds.val_path} ({ds.counts['val']} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
