"""Supervised fine-tuning and preference (DPO) data: JSONL records rendered with the tokenizer's
chat template, tokenized once, with a per-token mask of what the model is trained to say (the
assistant replies and the end-of-turn marker after each, so that it learns to stop), then packed
into fixed-length rows whose doc ids keep packed examples from attending to each other.

Every record that cannot be used is counted with its line number and reason, never silently
dropped; everything that can be checked is checked before any tokenization."""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tokenizers import Tokenizer

from loom.core.chat import (
    CHATML_END,
    CHATML_START,
    ROLES,
    ChatTemplate,
    Message,
    TemplateRejected,
)
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.tokenizer import EOS, load_tokenizer

IGNORE = -100  # target value for positions without loss (torch cross_entropy's ignore_index)
OVERLONG_MODES: tuple[str, ...] = ("truncate", "drop")
MALFORMED_SHOWN = 5
ENCODE_BATCH = 4096
SFT_SHAPES = (
    '{"messages": [{"role", "content"}, ...]}, {"prompt", "completion"}, '
    '{"instruction", "input" (optional), "output"}'
)
PREFERENCE_SHAPE = '{"prompt", "chosen", "rejected"}'

T = TypeVar("T")


@dataclass
class SFTExample:
    """One tokenized example; `trained[i]` says whether predicting `tokens[i]` has a loss."""

    tokens: list[int]
    trained: list[bool]
    line: int


@dataclass
class Rows:
    """Fixed-length training rows. Position j predicts targets[j] from inputs[:j+1] of the same
    doc id; targets are -100 where there is no loss (prompts, padding)."""

    inputs: torch.Tensor  # int64 [N, seq_len]
    targets: torch.Tensor  # int64 [N, seq_len]
    doc_ids: torch.Tensor  # int32 [N, seq_len]

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


@dataclass
class PairRows:
    """Preference pairs: row i of `chosen` and row i of `rejected` answer the same prompt."""

    chosen: Rows
    rejected: Rows

    def __len__(self) -> int:
        return len(self.chosen)


@dataclass
class DataReport:
    """What happened to every line of the input: kept, malformed, truncated or dropped."""

    kind: str = "sft"  # "sft" (examples are records) or "preference" (examples are pairs)
    lines: int = 0  # non-blank lines read, in all files
    examples: int = 0  # valid records
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_untrained: int = 0
    tokens: int = 0  # (input, target) positions of the kept examples
    trained_tokens: int = 0  # positions whose target has a loss
    train_examples: int = 0
    val_examples: int = 0
    rows: int = 0  # train + validation rows
    packing_efficiency: float = 0.0  # tokens / (rows * seq_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def add_malformed(self, where: str, reason: str) -> None:
        self.malformed += 1
        if len(self.malformed_examples) < MALFORMED_SHOWN:
            self.malformed_examples.append(f"{where}: {reason}")

    def log(self) -> None:
        """One summary line, and a warning for each kind of record that was not used as is."""
        unit = "pairs" if self.kind == "preference" else "examples"
        logger.info(
            "%s data: %s %s from %s lines -> %s train / %s val, %s rows, %s tokens "
            "(%s trained), packing efficiency %.1f%%",
            "preference" if self.kind == "preference" else "SFT",
            f"{self.examples:,}",
            unit,
            f"{self.lines:,}",
            f"{self.train_examples:,}",
            f"{self.val_examples:,}",
            f"{self.rows:,}",
            f"{self.tokens:,}",
            f"{self.trained_tokens:,}",
            100 * self.packing_efficiency,
        )
        if self.malformed:
            logger.warning(
                "%s malformed lines skipped (first: %s)",
                f"{self.malformed:,}",
                "; ".join(self.malformed_examples),
            )
        if self.truncated:
            logger.warning(
                "%s %s longer than the sequence length were truncated "
                "(--overlong drop drops them instead)",
                f"{self.truncated:,}",
                unit,
            )
        if self.dropped_overlong:
            logger.warning(
                "%s %s longer than the sequence length were dropped "
                "(--overlong truncate keeps their beginning instead)",
                f"{self.dropped_overlong:,}",
                unit,
            )
        if self.dropped_untrained:
            logger.warning(
                "%s %s were dropped because no trained token was left "
                "(the reply starts past the sequence length, or is empty)",
                f"{self.dropped_untrained:,}",
                unit,
            )


@dataclass
class SFTData:
    train: Rows
    val: Rows
    report: DataReport
    pad_id: int


@dataclass
class PreferenceData:
    train: PairRows
    val: PairRows
    report: DataReport
    pad_id: int


@dataclass
class _Rendered:
    """A record ready to tokenize: its text and the character spans that are trained."""

    line: int
    text: str
    spans: list[tuple[int, int]]


class _Malformed(ValueError):
    """A record that cannot be used; the message is the reason shown with its line number."""


# --------------------------------------------------------------------------- reading


def read_jsonl(path: str | Path) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str]]]:
    """The JSON objects of a JSONL file with their 1-based line numbers, and the lines that are
    not JSON objects with the reason each. Blank lines are ignored."""
    file = Path(path)
    if not file.is_file():
        raise LoomError(f"data file {file} does not exist")
    records: list[tuple[int, dict[str, Any]]] = []
    malformed: list[tuple[int, str]] = []
    with file.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                malformed.append((number, f"not valid UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except ValueError as e:
                malformed.append((number, f"not valid JSON ({e})"))
                continue
            if not isinstance(value, dict):
                malformed.append((number, f"a JSON {type(value).__name__}, not an object"))
                continue
            records.append((number, value))
    return records, malformed


def _string(record: dict[str, Any], key: str, *, empty_ok: bool = True) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise _Malformed(f'"{key}" must be a string, not {type(value).__name__}')
    if not empty_ok and not value.strip():
        raise _Malformed(f'"{key}" is empty')
    return value


def _messages(value: object, key: str) -> list[Message]:
    """A checked list of {"role", "content"} messages (only those two keys are kept)."""
    if not isinstance(value, list) or not value:
        raise _Malformed(f'"{key}" must be a non-empty list of {{"role", "content"}} messages')
    out: list[Message] = []
    for i, message in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise _Malformed(f'{where} must be an object with "role" and "content"')
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise _Malformed(f"{where} has role {role!r}; accepted roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _Malformed(f"{where}.content must be a string, not {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise _Malformed(f"{where} is an assistant message with empty content")
        out.append({"role": role, "content": content})
    if out[0]["role"] == "assistant":
        raise _Malformed(
            f"{key}[0] is an assistant message: a conversation must start with a "
            "system or user message"
        )
    return out


@dataclass
class _Conversation:
    """A parsed record: messages, which of them are trained, and the raw prompt/completion
    (None for chat records, which need a template)."""

    messages: list[Message]
    trained_turns: list[int]
    raw: tuple[str, str] | None


def _parse_sft(record: dict[str, Any]) -> _Conversation:
    """One SFT record of any of the three accepted shapes."""
    shapes = [
        name
        for name, keys in (
            ("messages", ("messages",)),
            ("prompt/completion", ("prompt", "completion")),
            ("instruction/output", ("instruction", "output")),
        )
        if all(k in record for k in keys)
    ]
    if not shapes:
        raise _Malformed(
            f"unknown record shape: found keys {sorted(record)}; accepted shapes: {SFT_SHAPES}"
        )
    if len(shapes) > 1:
        raise _Malformed(f"the record matches more than one shape ({', '.join(shapes)}); keep one")
    if shapes == ["messages"]:
        messages = _messages(record["messages"], "messages")
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise _Malformed('"messages" has no assistant message to train on')
        return _Conversation(messages, turns, None)
    if shapes == ["prompt/completion"]:
        prompt = _string(record, "prompt")
        answer = _string(record, "completion", empty_ok=False)
    else:
        prompt = _string(record, "instruction", empty_ok=False)
        extra = _string(record, "input") if record.get("input") is not None else ""
        if extra:
            prompt += "\n\n" + extra
        answer = _string(record, "output", empty_ok=False)
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return _Conversation(messages, [1], (prompt, answer))


def _answer(value: object, key: str) -> str:
    """A preference answer: a string, an assistant message, or a list with one of them."""
    if isinstance(value, list):
        if len(value) != 1:
            raise _Malformed(
                f'"{key}" must hold exactly one assistant message, not {len(value)} '
                '(put the conversation before the answer in "prompt")'
            )
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant" or not isinstance(value.get("content"), str):
            raise _Malformed(f'"{key}" must be an assistant message {{"role": "assistant", ...}}')
        value = value["content"]
    if not isinstance(value, str):
        raise _Malformed(f'"{key}" must be a string or an assistant message')
    if not value.strip():
        raise _Malformed(f'"{key}" is empty')
    return value


def _parse_preference(record: dict[str, Any]) -> tuple[_Conversation, _Conversation]:
    """One preference record: the same prompt answered by the chosen and the rejected reply."""
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise _Malformed(
            f"unknown record shape: found keys {sorted(record)}, missing {missing}; "
            f"accepted shape: {PREFERENCE_SHAPE}"
        )
    prompt = record["prompt"]
    raw_prompt: str | None = None
    if isinstance(prompt, str):
        raw_prompt = prompt
        messages = [{"role": "user", "content": prompt}]
    else:
        messages = _messages(prompt, "prompt")
    pair = []
    for key in ("chosen", "rejected"):
        answer = _answer(record[key], key)
        pair.append(
            _Conversation(
                [*messages, {"role": "assistant", "content": answer}],
                [len(messages)],
                None if raw_prompt is None else (raw_prompt, answer),
            )
        )
    return pair[0], pair[1]


# --------------------------------------------------------------------------- rendering


def _render(
    template: ChatTemplate, conv: _Conversation, line: int, eos: str, label: str = ""
) -> _Rendered:
    """Text and trained spans: in raw mode prompt + completion + eos; with a template, each
    trained assistant turn spans from the end of the generation prompt before it to the end of
    the rendering that includes it (so its end-of-turn marker is trained too)."""
    if template.is_raw:
        assert conv.raw is not None  # checked when the file was read
        prompt, answer = conv.raw
        text = prompt + answer + eos
        return _Rendered(line, text, [(len(prompt), len(text))])
    full = template.render(conv.messages)
    spans = []
    for turn in conv.trained_turns:
        before = template.render(conv.messages[:turn], add_generation_prompt=True)
        through = template.render(conv.messages[: turn + 1])
        if not (
            full.startswith(before) and full.startswith(through) and len(before) < len(through)
        ):
            raise LoomError(
                f"{label}line {line}: the chat template from {template.origin} does not render a "
                f"conversation's beginning as a prefix of the whole (at message {turn}), so the "
                "assistant replies cannot be located; such templates rewrite earlier turns (for "
                "example drop the reasoning of past replies) or add text only when later turns "
                "exist. Use one assistant reply per record, or set data.template=chatml"
            )
        spans.append((len(before), len(through)))
    return _Rendered(line, full, spans)


def _read(
    path: Path,
    parse: Callable[[dict[str, Any]], T],
    report: DataReport,
    label: str,
    needs_template: Callable[[T], bool],
    template: ChatTemplate,
) -> list[tuple[int, T]]:
    """Parsed records of one file; bad lines are counted in `report`. No usable record at all
    is an error that shows why the lines were rejected."""
    records, bad = read_jsonl(path)
    report.lines += len(records) + len(bad)
    reasons: list[tuple[int, str]] = list(bad)
    parsed: list[tuple[int, T]] = []
    for line, record in records:
        try:
            value = parse(record)
        except _Malformed as e:
            reasons.append((line, str(e)))
            continue
        if template.is_raw and needs_template(value):
            raise LoomError(
                f"{path} line {line}: chat records (a messages list) need a chat template, but "
                "data.template=none was given; use data.template=auto or chatml, or give prompt/"
                "completion records"
            )
        parsed.append((line, value))
    reasons.sort()
    for line, reason in reasons:
        report.add_malformed(f"{label}line {line}", reason)
    if not parsed:
        if not reasons:
            raise LoomError(f"data file {path} is empty: give one JSON record per line")
        shown = "; ".join(f"line {n}: {r}" for n, r in reasons[:MALFORMED_SHOWN])
        raise LoomError(
            f"data file {path} has no usable record: all {len(reasons)} non-blank lines are "
            f"malformed (first: {shown})"
        )
    return parsed


# --------------------------------------------------------------------------- tokenizing


def _token_id(tokenizer: Tokenizer, text: str | None) -> int | None:
    return None if text is None else tokenizer.token_to_id(text)


def _eos_text(template: ChatTemplate, tokenizer: Tokenizer, folder: Path) -> str:
    """The end-of-sequence token raw mode appends (the model must learn to stop)."""
    for text in (template.eos_token, EOS):
        if text is not None and tokenizer.token_to_id(text) is not None:
            return text
    raise LoomError(
        f"data.template=none appends the end-of-sequence token, but the tokenizer in {folder} has "
        f'none: set "eos_token" in {folder / "tokenizer_config.json"} to a token of its vocabulary'
    )


def _pad_id(template: ChatTemplate, tokenizer: Tokenizer) -> int:
    """The tokenizer's pad token, else its end-of-sequence token, else 0 (padding has no loss
    and is masked by doc id, so its value only needs to be a valid id)."""
    pad = _token_id(tokenizer, template.special_tokens.get("pad_token"))
    if pad is None and tokenizer.padding is not None:
        pad = tokenizer.padding.get("pad_id")
    if pad is None:
        pad = _token_id(tokenizer, template.eos_token)
    if pad is None:
        pad = tokenizer.token_to_id(EOS)
    return int(pad) if pad is not None else 0


def _tokenize(tokenizer: Tokenizer, rendered: Sequence[_Rendered]) -> list[SFTExample]:
    """Token ids of each text, and which of them start inside (or overlap) a trained span."""
    examples: list[SFTExample] = []
    for start in range(0, len(rendered), ENCODE_BATCH):
        batch = rendered[start : start + ENCODE_BATCH]
        encodings = tokenizer.encode_batch([r.text for r in batch], add_special_tokens=False)
        for r, enc in zip(batch, encodings, strict=True):
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            begins = offsets[:, 0]
            ends = np.maximum(offsets[:, 1], begins + 1)  # zero-width tokens count at their start
            trained = np.zeros(len(enc.ids), dtype=bool)
            for lo, hi in r.spans:
                trained |= (begins < hi) & (ends > lo)
            examples.append(SFTExample(list(enc.ids), trained.tolist(), r.line))
    return examples


def _fit(example: SFTExample, seq_len: int) -> SFTExample:
    """The first seq_len + 1 tokens (seq_len input/target positions)."""
    n = seq_len + 1
    return SFTExample(example.tokens[:n], example.trained[:n], example.line)


def _has_target(example: SFTExample) -> bool:
    return any(example.trained[1:])


def _length_rule(
    groups: list[list[SFTExample]], seq_len: int, overlong: str, report: DataReport
) -> list[list[SFTExample]]:
    """Truncate or drop overlong groups (an SFT example, or a preference pair together), then
    drop groups where some member has no trained target left."""
    kept = []
    for group in groups:
        if any(len(e.tokens) - 1 > seq_len for e in group):
            if overlong == "drop":
                report.dropped_overlong += 1
                continue
            report.truncated += 1
            group = [_fit(e, seq_len) for e in group]
        if not all(_has_target(e) for e in group):
            report.dropped_untrained += 1
            continue
        kept.append(group)
    return kept


# --------------------------------------------------------------------------- split and rows


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of range(n): (train, val), both sorted and disjoint. At least one
    validation item when n >= 2 and val_fraction > 0, and always at least one training item."""
    if n < 2 or val_fraction <= 0:
        return list(range(n)), []
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    val = sorted(random.Random(seed).sample(range(n), n_val))
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], val


def _first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: longest first, each into the first bin with room. A max-tree over
    the bins' free space finds that bin in O(log n), so large datasets pack quickly."""
    n = len(lengths)
    size = 1
    while size < max(n, 1):
        size *= 2
    free = [capacity] * (2 * size)  # leaves: free space of bin i (unopened bins are empty)
    bins: list[list[int]] = []
    for item in sorted(range(n), key=lambda i: (-lengths[i], i)):
        need = lengths[item]
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        index = node - size
        if index == len(bins):
            bins.append([])
        bins[index].append(item)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def make_rows(
    examples: Sequence[SFTExample], seq_len: int, pad_id: int, *, packing: bool = True
) -> Rows:
    """Rows of seq_len positions. Packed: whole examples, first-fit decreasing; unpacked: one
    example per row. In each row the examples get doc ids 0, 1, ... and the padding the next id,
    so attention restricted to equal doc ids (and causal) never crosses examples."""
    for e in examples:
        if not 2 <= len(e.tokens) <= seq_len + 1:
            raise ValueError(f"line {e.line}: {len(e.tokens)} tokens do not fit seq_len {seq_len}")
    lengths = [len(e.tokens) - 1 for e in examples]
    bins = (
        _first_fit_decreasing(lengths, seq_len) if packing else [[i] for i in range(len(examples))]
    )
    inputs = np.full((len(bins), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(bins), seq_len), IGNORE, dtype=np.int64)
    doc_ids = np.zeros((len(bins), seq_len), dtype=np.int32)
    for row, items in enumerate(bins):
        pos = 0
        for doc, item in enumerate(items):
            tokens = np.asarray(examples[item].tokens, dtype=np.int64)
            trained = np.asarray(examples[item].trained, dtype=bool)
            end = pos + len(tokens) - 1
            inputs[row, pos:end] = tokens[:-1]
            targets[row, pos:end] = np.where(trained[1:], tokens[1:], IGNORE)
            doc_ids[row, pos:end] = doc
            pos = end
        doc_ids[row, pos:] = len(items)
    return Rows(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(doc_ids))


# --------------------------------------------------------------------------- entry points


@dataclass
class _Setup:
    tokenizer: Tokenizer
    template: ChatTemplate
    eos: str
    pad_id: int


def _setup(
    paths: Sequence[Path],
    tokenizer_dir: str | Path,
    seq_len: int,
    template: str,
    overlong: str,
    val_fraction: float,
) -> _Setup:
    """Every argument checked, the tokenizer and the template loaded, before reading data."""
    if seq_len < 1:
        raise LoomError(f"seq_len must be at least 1, not {seq_len}")
    if overlong not in OVERLONG_MODES:
        raise LoomError(f"--overlong {overlong!r} is not one of {', '.join(OVERLONG_MODES)}")
    if not 0 <= val_fraction < 1:
        raise LoomError(f"--val-fraction must be in [0, 1), not {val_fraction}")
    for path in paths:
        if not path.is_file():
            raise LoomError(f"data file {path} does not exist")
    folder = Path(tokenizer_dir)
    tokenizer = load_tokenizer(folder)
    tokenizer.no_truncation()
    chat = ChatTemplate.from_tokenizer_dir(folder if folder.is_dir() else folder.parent, template)
    if chat.is_builtin_chatml and tokenizer.token_to_id(CHATML_END) is None:
        logger.warning(
            "the tokenizer in %s has no %s/%s tokens: the ChatML markers are split into ordinary "
            "tokens (it works, but costs tokens; a tokenizer with them is better)",
            folder,
            CHATML_START,
            CHATML_END,
        )
    eos = _eos_text(chat, tokenizer, folder) if chat.is_raw else ""
    pad_id = _pad_id(chat, tokenizer)
    tokenizer.no_padding()
    return _Setup(tokenizer, chat, eos, pad_id)


def _render_all(
    setup: _Setup,
    parsed: Sequence[tuple[int, Sequence[_Conversation]]],
    report: DataReport,
    path: Path,
    label: str,
) -> list[list[_Rendered]]:
    """Rendered groups; a conversation the template rejects (raise_exception) is malformed."""
    out = []
    first_rejection: str | None = None
    for line, group in parsed:
        try:
            out.append([_render(setup.template, conv, line, setup.eos, label) for conv in group])
        except TemplateRejected as e:
            report.add_malformed(f"{label}line {line}", str(e))
            if first_rejection is None:
                first_rejection = f"{label}line {line}: {e}"
    if not out and first_rejection is not None:
        raise LoomError(
            f"the chat template rejected every record of {path} (first: {first_rejection}); "
            "fix the records, or set data.template=chatml"
        )
    return out


def _build_groups(
    path: Path,
    val_path: Path | None,
    setup: _Setup,
    parse: Callable[[dict[str, Any]], Sequence[_Conversation]],
    report: DataReport,
    seq_len: int,
    overlong: str,
    val_fraction: float,
    seed: int,
) -> tuple[list[list[SFTExample]], list[list[SFTExample]]]:
    """Train and validation groups (one example per SFT record, two per preference pair)."""

    def is_chat(group: Sequence[_Conversation]) -> bool:
        return any(conv.raw is None for conv in group)

    files = [(path, "")] + ([(val_path, f"{val_path.name} ")] if val_path else [])
    parsed = [_read(f, parse, report, label, is_chat, setup.template) for f, label in files]
    rendered = [
        _render_all(setup, p, report, f, label) for p, (f, label) in zip(parsed, files, strict=True)
    ]
    report.examples = sum(len(r) for r in rendered)
    grouped: list[list[list[SFTExample]]] = []
    for groups in rendered:
        flat = _tokenize(setup.tokenizer, [r for group in groups for r in group])
        width = len(groups[0]) if groups else 1
        pieces = [flat[i : i + width] for i in range(0, len(flat), width)]
        grouped.append(_length_rule(pieces, seq_len, overlong, report))
    if val_path is not None:
        train, val = grouped
    else:
        train_idx, val_idx = split_indices(len(grouped[0]), val_fraction, seed)
        train = [grouped[0][i] for i in train_idx]
        val = [grouped[0][i] for i in val_idx]
    if not train:
        raise LoomError(
            f"no training example of {path} is left after the length rules "
            f"({report.dropped_overlong} too long, {report.dropped_untrained} without a trained "
            "token): raise the sequence length, or use --overlong truncate"
        )
    report.train_examples, report.val_examples = len(train), len(val)
    for group in train + val:
        for e in group:
            report.tokens += len(e.tokens) - 1
            report.trained_tokens += sum(e.trained[1:])
    return train, val


def _finish(report: DataReport, rows: int, width: int, seq_len: int) -> None:
    report.rows = rows
    capacity = rows * width * seq_len
    report.packing_efficiency = report.tokens / capacity if capacity else 0.0
    report.log()


def _read_groups(
    kind: str,
    parse: Callable[[dict[str, Any]], Sequence[_Conversation]],
    path: str | Path,
    val_path: str | Path | None,
    tokenizer_dir: str | Path,
    seq_len: int,
    template: str,
    overlong: str,
    val_fraction: float,
    seed: int,
) -> tuple[_Setup, DataReport, list[list[SFTExample]], list[list[SFTExample]]]:
    """Arguments checked, then the train and validation groups of a file of `kind` records."""
    data = Path(path)
    val_file = Path(val_path) if val_path is not None else None
    files = [data] + ([val_file] if val_file else [])
    setup = _setup(files, tokenizer_dir, seq_len, template, overlong, val_fraction)
    report = DataReport(kind=kind)
    train, val = _build_groups(
        data, val_file, setup, parse, report, seq_len, overlong, val_fraction, seed
    )
    return setup, report, train, val


def build_sft(
    path: str | Path,
    tokenizer_dir: str | Path,
    seq_len: int,
    *,
    template: str = "auto",
    overlong: str = "truncate",
    val_fraction: float = 0.05,
    val_path: str | Path | None = None,
    seed: int = 0,
    packing: bool = True,
) -> SFTData:
    """Train and validation rows of a JSONL SFT file (chat, prompt/completion or
    instruction/output records, detected per line). Logs the report's summary."""
    setup, report, train, val = _read_groups(
        "sft",
        lambda record: [_parse_sft(record)],
        path,
        val_path,
        tokenizer_dir,
        seq_len,
        template,
        overlong,
        val_fraction,
        seed,
    )
    train_rows = make_rows([g[0] for g in train], seq_len, setup.pad_id, packing=packing)
    val_rows = make_rows([g[0] for g in val], seq_len, setup.pad_id, packing=packing)
    _finish(report, len(train_rows) + len(val_rows), 1, seq_len)
    return SFTData(train_rows, val_rows, report, setup.pad_id)


def build_preferences(
    path: str | Path,
    tokenizer_dir: str | Path,
    seq_len: int,
    *,
    template: str = "auto",
    overlong: str = "truncate",
    val_fraction: float = 0.05,
    val_path: str | Path | None = None,
    seed: int = 0,
) -> PreferenceData:
    """Train and validation pair rows of a JSONL preference file ({"prompt", "chosen",
    "rejected"} records), one example per row. Logs the report's summary."""
    setup, report, train, val = _read_groups(
        "preference",
        _parse_preference,
        path,
        val_path,
        tokenizer_dir,
        seq_len,
        template,
        overlong,
        val_fraction,
        seed,
    )

    def pair_rows(groups: list[list[SFTExample]]) -> PairRows:
        return PairRows(
            make_rows([g[0] for g in groups], seq_len, setup.pad_id, packing=False),
            make_rows([g[1] for g in groups], seq_len, setup.pad_id, packing=False),
        )

    train_rows, val_rows = pair_rows(train), pair_rows(val)
    _finish(report, len(train_rows) + len(val_rows), 2, seq_len)
    return PreferenceData(train_rows, val_rows, report, setup.pad_id)
