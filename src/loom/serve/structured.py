"""Structured output: answers that follow a JSON schema, and tool calls, enforced while sampling.

A request's grammar (a JSON schema, any JSON object, or <tool_call> blocks whose JSON names a
function and holds arguments that follow its parameters) is compiled by llguidance, the
grammar engine of Microsoft's Guidance (also used by vLLM, SGLang and llama.cpp), against the
served tokenizer. Each sequence gets a matcher; before every sampled token it masks the logits
of every token that would break the grammar, so the answer is valid whatever the model wants
to say, and the sequence stops as soon as the grammar is complete. Only `max_tokens` (or the
context) can cut an answer short: its finish_reason is then "length" and the text a prefix of
a valid answer.

JSON is written with fixed separators, as Python's `json.dumps` writes it (`{"a": 1, "b": 2}`:
no newlines or indentation). Free whitespace lets small models pad an answer with spaces until
max_tokens, a known failure of grammar-constrained JSON.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch
from tokenizers import Tokenizer

from loom.core.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from loom.core.log import logger
from loom.serve.responses import APIError

# llguidance's JSON options: the separators of json.dumps, no other whitespace.
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Any JSON object (OpenAI's response_format {"type": "json_object"}).
ANY_OBJECT: dict[str, Any] = {"type": "object"}
# A function defined without `parameters` takes none (OpenAI's rule).
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
# What OpenAI accepts as a function name.
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass
class ToolSpec:
    """A function the model may call: its name and the JSON schema of its arguments."""

    name: str
    parameters: dict[str, Any]


class Grammars:
    """llguidance's view of the served tokenizer, and the grammars requests ask for. The
    tokenizer is converted on first use (a fraction of a second for a 50k vocabulary) and
    shared by all requests; each grammar is checked before anything is generated."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: Iterable[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab = tokenizer.get_vocab_size()
        self.stop_ids = sorted(i for i in stop_ids if 0 <= i < self.vocab)
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:
                # Its end-of-text tokens are the engine's: allowed only where the grammar is
                # complete (the engine stops on them).
                self._ll = llguidance.LLTokenizer(
                    self.tokenizer.to_str(), eos_token=self.stop_ids or None
                )
            return self._ll

    def check(self, lark: str, param: str, what: str) -> None:
        """Raise a 400 naming `param` when llguidance cannot enforce the grammar."""
        problem = _grammar_problem(lark, self.ll_tokenizer())
        if problem:
            raise APIError(
                400,
                f"{param} cannot be enforced: {problem}; fix {what} (JSON Schema: types, "
                "properties, required, enum, const, anyOf, items, $ref, string lengths and "
                "patterns, number ranges)",
                param,
            )

    def answer_grammar(self, schema: dict[str, Any], param: str) -> str:
        """A checked grammar of one JSON value following `schema` (the request's field
        `param`)."""
        _check_json_text(schema, param)
        lark = "start: " + json_rule(schema)
        self.check(lark, param, "the schema")
        return lark

    def tool_grammar(
        self, tools: list[ToolSpec], parallel: bool, answer: dict[str, Any] | None = None
    ) -> str:
        """A checked grammar of Hermes tool calls (one, or several on separate lines when
        `parallel`), each naming one of `tools` (whose parameters are checked already, by
        `answer_grammar`) with arguments that follow its parameters; with `answer`, a JSON
        answer following that schema is allowed instead of calls."""
        lark = tool_call_lark(tools, parallel, answer)
        self.check(lark, "tools", "the tools")
        return lark

    def constraint(self, lark: str) -> GrammarConstraint:
        """A fresh matcher over a checked grammar, for one sequence."""
        matcher = llguidance.LLMatcher(self.ll_tokenizer(), lark, log_level=0)
        return GrammarConstraint(matcher, self.vocab, bool(self.stop_ids))


class GrammarConstraint:
    """The engine's TokenConstraint over an llguidance matcher: the matcher's token bitmask
    applied to the logits (ids the model has beyond the tokenizer's vocabulary, padding rows
    of its embedding, are always masked)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int, can_end: bool) -> None:
        self.matcher, self.vocab, self.can_end = matcher, vocab, can_end

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        # One byte per token (0: forbidden), the cheapest form to turn into a tensor (about
        # 0.1 ms for a 50k vocabulary).
        bias = np.frombuffer(self.matcher.compute_logit_bias(), dtype=np.uint8)
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
        n = min(self.vocab, logits.shape[-1], len(bias))
        allowed[:n] = torch.from_numpy(bias[:n] != 0)
        if not allowed.any():  # a matcher in error: let the sequence end at the next token
            logger.warning("structured output: the grammar allows no token (%s)", self._error())
            return logits
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def accept(self, token: int) -> bool:
        if not self.matcher.consume_token(token):
            logger.warning(
                "structured output: token %d broke the grammar (%s)", token, self._error()
            )
            return True
        if self.matcher.is_stopped():
            return True
        # Without end-of-text tokens the answer ends where the grammar first could.
        return not self.can_end and self.matcher.is_accepting()

    def _error(self) -> str:
        return self.matcher.get_error().splitlines()[0] if self.matcher.is_error() else "no error"


def json_rule(schema: dict[str, Any]) -> str:
    """A Lark rule body for llguidance: a JSON value following `schema`, in JSON_STYLE."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_STYLE}, ensure_ascii=False)


def tool_call_lark(tools: list[ToolSpec], parallel: bool, answer: dict[str, Any] | None) -> str:
    """The Lark grammar of tool calls as Hermes models write them,
    `<tool_call>\n{"name": NAME, "arguments": {...}}\n</tool_call>`, one per line. The
    arguments are a JSON document of their own, so the parameters' `$ref`s resolve."""
    rules = [
        "calls: call" + (' ("\\n" call)*' if parallel else ""),
        "call: " + " | ".join(f"tool{i}" for i in range(len(tools))),
    ]
    for i, tool in enumerate(tools):
        head = f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(tool.name)}, "arguments": '
        tail = f"}}\n{TOOL_CALL_CLOSE}"
        rules.append(f"tool{i}: {json.dumps(head)} arguments{i} {json.dumps(tail)}")
        rules.append(f"arguments{i}: {json_rule(tool.parameters)}")
    if answer is None:
        return "start: calls\n" + "\n".join(rules)
    return "start: answer | calls\n" + "\n".join([f"answer: {json_rule(answer)}", *rules])


def _grammar_problem(lark: str, tokenizer: llguidance.LLTokenizer) -> str:
    """llguidance's complaint about a grammar (its first line, without the position), or ''."""
    try:
        message = llguidance.LLMatcher.validate_grammar(lark, tokenizer)
    except BaseException as e:  # pyo3 raises a Rust panic as a BaseException
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        message = f"{type(e).__name__}: {e}"
    if not message:
        return ""
    lines = []
    for line in message.strip().splitlines():
        if _SOURCE_LINE.match(line):  # llguidance quotes the grammar from here on
            break
        if line.strip(" ^"):
            lines.append(line.strip())
    text = re.sub(r"^at \d+\(\d+\): ", "", " ".join(lines))
    return text.removeprefix("failed to compile JSON schema: ")


_SOURCE_LINE = re.compile(r"^\s*\d+ \| ")


def _check_json_text(schema: dict[str, Any], param: str) -> None:
    """A schema must be JSON that UTF-8 can carry (no lone surrogates, no NaN)."""
    try:
        json.dumps(schema, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (ValueError, RecursionError) as e:
        problem = "it holds NaN or infinity" if "JSON compliant" in str(e) else str(e)
        raise APIError(
            400, f"{param} is not a valid JSON schema ({problem}); fix the schema", param
        ) from None
