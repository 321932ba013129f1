"""GRPO's data: prompts (a string or chat messages) with whatever other fields the reward
functions read, rendered for generation with the base model's chat template."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from loom.core.chat import ChatTemplate
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.data.loader import SampleOrder
from loom.finetune.sft_data import MALFORMED_SHOWN, read_jsonl, split_indices

PROMPT_SHAPE = '{"prompt": str or [{"role", "content"}, ...], ...any fields the rewards read}'


@dataclass
class Prompt:
    """One prompt: its record (given to the reward functions) and its rendered tokens."""

    record: dict[str, Any]
    ids: list[int]


@dataclass
class PromptReport:
    """What happened to every line: kept, malformed, or too long to leave room to answer."""

    lines: int = 0
    malformed: int = 0
    malformed_examples: list[str] = field(default_factory=list)
    dropped_overlong: int = 0
    train_prompts: int = 0
    val_prompts: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def render_prompt(template: ChatTemplate, prompt: Any) -> str:
    """The text the policy continues: the chat template's rendering up to the assistant's turn,
    or the prompt string itself with no template (data.template=none)."""
    if isinstance(prompt, str):
        if template.is_raw:
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    return template.render(prompt, add_generation_prompt=True)


def _check(record: dict[str, Any], template: ChatTemplate) -> str | None:
    """Why a record cannot be a prompt (None: it can)."""
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return None if prompt.strip() else '"prompt" is empty'
    if (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in prompt
        )
    ):
        return (
            "chat messages need a chat template (data.template=none)" if template.is_raw else None
        )
    return f'no usable "prompt"; accepted shape: {PROMPT_SHAPE}'


def read_prompts(
    path: Path,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    longest: int,
    report: PromptReport,
) -> list[Prompt]:
    """The usable prompts of a JSONL file; the others counted in `report`. A prompt longer
    than `longest` tokens leaves no room for its answer and is dropped (counted)."""
    records, bad = read_jsonl(path)
    report.lines += len(records) + len(bad)
    reasons = list(bad)
    prompts = []
    for line, record in records:
        reason = _check(record, template)
        if reason is not None:
            reasons.append((line, reason))
            continue
        text = render_prompt(template, record["prompt"])
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if len(ids) > longest:
            report.dropped_overlong += 1
            continue
        prompts.append(Prompt(record, ids))
    for line, reason in sorted(reasons):
        report.malformed += 1
        if len(report.malformed_examples) < MALFORMED_SHOWN:
            report.malformed_examples.append(f"{path.name} line {line}: {reason}")
    if not prompts:
        raise LoomError(
            f"data file {path} has no usable prompt ({len(reasons)} malformed, "
            f"{report.dropped_overlong} longer than {longest} tokens); accepted: {PROMPT_SHAPE}"
        )
    return prompts


def load_prompts(
    path: Path,
    val_path: Path | None,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    longest: int,
    val_fraction: float,
    seed: int,
) -> tuple[list[Prompt], list[Prompt], PromptReport]:
    """Train and validation prompts (a separate file, or a seeded share of the one)."""
    report = PromptReport()
    train = read_prompts(path, tokenizer, template, longest, report)
    if val_path is not None:
        val = read_prompts(val_path, tokenizer, template, longest, report)
    else:
        keep, held = split_indices(len(train), val_fraction, seed)
        train, val = [train[i] for i in keep], [train[i] for i in held]
    report.train_prompts, report.val_prompts = len(train), len(val)
    logger.info(
        "GRPO prompts: %d lines -> %d train / %d val (%d malformed, %d too long to answer)",
        report.lines,
        len(train),
        len(val),
        report.malformed,
        report.dropped_overlong,
    )
    for example in report.malformed_examples:
        logger.warning("skipped %s", example)
    return train, val, report


class PromptLoader(SampleOrder):
    """Prompts in a seeded, resumable order; a batch is the prompts' indices."""

    def __init__(self, prompts: list[Prompt], seq_len: int, seed: int) -> None:
        super().__init__([len(prompts)], [1.0], seq_len, seed, shuffle=True)
        self.prompts = prompts

    def batch(self, pairs: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(pairs[:, 1].astype(np.int64))]
