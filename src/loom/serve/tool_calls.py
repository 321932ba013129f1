"""Tool calls in a model's answer: the Hermes format's <tool_call> blocks (`{"name": ...,
"arguments": {...}}` between the tags), split from the rest of the answer whole or as it
streams. A block that is not JSON calling a requested function with object arguments stays
in the answer's text."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from loom.core.chat import TOOL_CALL_CLOSE, TOOL_CALL_OPEN


@dataclass
class ToolCall:
    """A call parsed from the model's answer, in OpenAI's shape (arguments as JSON text)."""

    id: str
    name: str
    arguments: str

    def as_dict(self) -> dict[str, Any]:
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


def parse_tool_call(body: str, names: set[str]) -> ToolCall | None:
    """The call in one <tool_call> block's text, or None when it is not JSON naming one of
    `names` with object arguments (such a block stays in the answer's text)."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    text = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], text)


class ToolCallParser:
    """Splits an answer, as it streams, into content and tool calls: text outside
    <tool_call> blocks is content (what could still become a block's opening tag is held
    back), each closed block that parses is a call. When the content is only whitespace
    (the newlines between calls) there is none, so streamed pieces join to the whole
    answer's content."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.buffer = ""  # text not yet split
        self.in_call = False
        self.held = ""  # leading whitespace, held back until other content follows it
        self.any_content = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> list[str | ToolCall]:
        """Content pieces and calls completed by `text`, in order."""
        self.buffer += text
        out: list[str | ToolCall] = []
        while True:
            if self.in_call:
                end = self.buffer.find(TOOL_CALL_CLOSE)
                if end < 0:
                    return out
                body, self.buffer = self.buffer[:end], self.buffer[end + len(TOOL_CALL_CLOSE) :]
                self.in_call = False
                call = parse_tool_call(body.strip(), self.names)
                if call is not None:
                    self.calls.append(call)
                    out.append(call)
                else:
                    out += self._content(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
                continue
            start = self.buffer.find(TOOL_CALL_OPEN)
            if start >= 0:
                out += self._content(self.buffer[:start])
                self.buffer = self.buffer[start + len(TOOL_CALL_OPEN) :]
                self.in_call = True
                continue
            keep = _partial_tag(self.buffer)
            out += self._content(self.buffer[: len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep :]
            return out

    def finish(self) -> list[str | ToolCall]:
        """What is left at the end: an unclosed block, or a partial tag, is content."""
        rest = (TOOL_CALL_OPEN if self.in_call else "") + self.buffer
        self.buffer, self.in_call = "", False
        return self._content(rest)

    def _content(self, text: str) -> list[str | ToolCall]:
        """Content to send: whitespace is held back until some other content comes."""
        if not text:
            return []
        if self.any_content:
            return [text]
        self.held += text
        if not self.held.strip():
            return []
        text, self.held, self.any_content = self.held, "", True
        return [text]


def _partial_tag(text: str) -> int:
    """The length of the longest end of `text` that could begin TOOL_CALL_OPEN."""
    for n in range(min(len(text), len(TOOL_CALL_OPEN) - 1), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-n:]):
            return n
    return 0


def split_tool_calls(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """A whole answer's content (None when there is none) and its tool calls."""
    parser = ToolCallParser(names)
    pieces = parser.feed(text) + parser.finish()
    content = "".join(p for p in pieces if isinstance(p, str))
    return content or None, parser.calls
