"""Answers in OpenAI's shapes, in one place: a request's sequences in the engine, their events
gathered into one JSON body or streamed as server-sent events, and OpenAI's error body.

The engine thread delivers events onto the event loop's queue; whichever way the answer
ends (done, failed, client gone), the request's sequences are aborted so nothing more is
generated for it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request

from loom.core.errors import LoomError
from loom.serve.engine import (
    Engine,
    QueueFull,
    SamplingParams,
    Sequence,
    SequenceEvent,
    TokenConstraint,
    TokenLogprob,
)
from loom.serve.tool_calls import ToolCallParser, split_tool_calls

FAILED = ("error", "abort")


class APIError(Exception):
    """A request the API refuses: answered with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str, param: str | None = None, code: str = "") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code or None}}


class CompletionForm:
    """/v1/completions: the same choice shape whole and streamed."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def choice(
        self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish_reason: str
    ) -> dict[str, Any]:
        formatted = None if logprobs is None else _completion_logprobs(logprobs)
        return {"index": index, "text": text, "logprobs": formatted, "finish_reason": finish_reason}

    def chunks(
        self,
        index: int,
        text: str,
        logprobs: list[TokenLogprob] | None,
        finish_reason: str | None,
    ) -> list[dict[str, Any]]:
        """The chunk choices for one event (none when it brings nothing)."""
        if not text and finish_reason is None:
            return []
        formatted = None if logprobs is None else _completion_logprobs(logprobs)
        return [
            {"index": index, "text": text, "logprobs": formatted, "finish_reason": finish_reason}
        ]

    def openers(self, n: int) -> list[dict[str, Any]]:
        return []


class ChatForm:
    """/v1/chat/completions: a message whole, deltas streamed after one role delta each. With
    tool names, <tool_call> blocks calling them are parsed out of the answer into
    `tool_calls` (whole: the message's; streamed: `delta.tool_calls`, one call at a time,
    as each block closes), and an answer that calls ends with finish_reason "tool_calls"."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, tool_names: set[str] | None = None) -> None:
        self.tool_names = tool_names or set()
        self._parsers: dict[int, ToolCallParser] = {}
        self._pending: dict[int, list[TokenLogprob]] = {}  # logprobs of text held back

    def choice(
        self, index: int, text: str, logprobs: list[TokenLogprob] | None, finish_reason: str
    ) -> dict[str, Any]:
        formatted = None if logprobs is None else _chat_logprobs(logprobs)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if self.tool_names:
            content, calls = split_tool_calls(text, self.tool_names)
            message["content"] = content
            if calls:
                message["tool_calls"] = [call.as_dict() for call in calls]
                finish_reason = _tools_finish(finish_reason)
        return {
            "index": index,
            "message": message,
            "logprobs": formatted,
            "finish_reason": finish_reason,
        }

    def chunks(
        self,
        index: int,
        text: str,
        logprobs: list[TokenLogprob] | None,
        finish_reason: str | None,
    ) -> list[dict[str, Any]]:
        """The chunk choices for one event (none when it brings nothing yet)."""
        if not self.tool_names:
            if not text and finish_reason is None:
                return []
            return [self._chunk(index, {"content": text} if text else {}, logprobs, finish_reason)]
        parser = self._parsers.setdefault(index, ToolCallParser(self.tool_names))
        wants = logprobs is not None
        self._pending.setdefault(index, []).extend(logprobs or [])
        pieces = parser.feed(text) + (parser.finish() if finish_reason is not None else [])
        out = []
        for piece in pieces:
            if isinstance(piece, str):
                out.append(self._chunk(index, {"content": piece}, self._take(index, wants), None))
                continue
            # A call: its id and name, then its arguments (the way OpenAI streams them).
            at = parser.calls.index(piece)
            head = {**piece.as_dict(), "index": at}
            head["function"] = {"name": piece.name, "arguments": ""}
            out.append(self._chunk(index, {"tool_calls": [head]}, self._take(index, wants), None))
            body = {"index": at, "function": {"arguments": piece.arguments}}
            out.append(self._chunk(index, {"tool_calls": [body]}, self._take(index, wants), None))
        if finish_reason is not None:
            reason = _tools_finish(finish_reason) if parser.calls else finish_reason
            out.append(self._chunk(index, {}, self._take(index, wants), reason))
        return out

    def _take(self, index: int, wants: bool) -> list[TokenLogprob] | None:
        """The logprobs of the text since the last chunk of choice `index`."""
        if not wants:
            return None
        taken, self._pending[index] = self._pending[index], []
        return taken

    @staticmethod
    def _chunk(
        index: int,
        delta: dict[str, Any],
        logprobs: list[TokenLogprob] | None,
        finish_reason: str | None,
    ) -> dict[str, Any]:
        formatted = None if logprobs is None else _chat_logprobs(logprobs)
        return {
            "index": index,
            "delta": delta,
            "logprobs": formatted,
            "finish_reason": finish_reason,
        }

    def openers(self, n: int) -> list[dict[str, Any]]:
        delta = {"role": "assistant", "content": ""}
        return [
            {"index": i, "delta": delta, "logprobs": None, "finish_reason": None} for i in range(n)
        ]


def _tools_finish(finish_reason: str) -> str:
    """An answer that ended by itself after calling tools ended to call them."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


ResponseForm = CompletionForm | ChatForm
COMPLETION = CompletionForm()
CHAT = ChatForm()


class Generation:
    """One request's sequences in the engine, and the queue their events arrive on."""

    def __init__(
        self,
        engine: Engine,
        prompt: list[int],
        params: list[SamplingParams],
        adapter: int,
        constraint: Callable[[], TokenConstraint] | None = None,
    ) -> None:
        self.engine = engine
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, SequenceEvent]] = asyncio.Queue()

        def deliver(index: int) -> Callable[[SequenceEvent], None]:
            def put(event: SequenceEvent) -> None:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

            return put

        self.sequences = [
            Sequence(prompt, p, deliver(i), adapter, None if constraint is None else constraint())
            for i, p in enumerate(params)
        ]

    def submit(self) -> None:
        try:
            self.engine.submit(self.sequences)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except LoomError as e:
            raise APIError(400, str(e)) from None

    def abort(self) -> None:
        self.engine.abort(self.sequences)

    def wants_logprobs(self, index: int) -> bool:
        return self.sequences[index].params.logprobs is not None

    def usage(self, completion_tokens: int) -> dict[str, int]:
        prompt_tokens = len(self.sequences[0].prompt_ids)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def abort_on_disconnect(self, request: Request) -> None:
        """Stop the generation when the client goes away (checked every 0.1 s)."""
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        self.abort()


async def collect(
    generation: Generation, request: Request, header: dict[str, Any], form: ResponseForm
) -> dict[str, Any]:
    """The whole answer as one body, once every choice has finished."""
    n = len(generation.sequences)
    texts = [""] * n
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    reasons: list[str | None] = [None] * n
    completion_tokens = 0
    watcher = asyncio.create_task(generation.abort_on_disconnect(request))
    try:
        while any(r is None for r in reasons):
            index, event = await generation.queue.get()
            texts[index] += event.text
            logprobs[index] += event.logprobs
            if event.finish_reason is not None:
                reasons[index] = event.finish_reason
                completion_tokens += event.completion_tokens
    finally:  # done, or cancelled: nothing more is generated either way
        watcher.cancel()
        generation.abort()
    if any(r in FAILED for r in reasons):
        raise APIError(500, "generation failed in the engine; see the server log")
    choices = [
        form.choice(
            i, texts[i], logprobs[i] if generation.wants_logprobs(i) else None, str(reasons[i])
        )
        for i in range(n)
    ]
    usage = generation.usage(completion_tokens)
    return {**header, "object": form.object, "choices": choices, "usage": usage}


async def stream(
    generation: Generation, header: dict[str, Any], form: ResponseForm, include_usage: bool
) -> AsyncIterator[str]:
    """The answer as server-sent events: chunks as tokens arrive, then `[DONE]`."""
    chunk_header = {**header, "object": form.chunk_object}
    open_choices = set(range(len(generation.sequences)))
    completion_tokens = 0
    try:
        for opener in form.openers(len(generation.sequences)):
            yield _sse({**chunk_header, "choices": [opener]})
        while open_choices:
            index, event = await generation.queue.get()
            if event.finish_reason in FAILED:
                yield _sse(error_body("generation failed in the engine", "server_error"))
                return
            if event.finish_reason is not None:
                open_choices.discard(index)
                completion_tokens += event.completion_tokens
            items = event.logprobs if generation.wants_logprobs(index) else None
            for choice in form.chunks(index, event.text, items, event.finish_reason):
                body: dict[str, Any] = {**chunk_header, "choices": [choice]}
                if include_usage:
                    body["usage"] = None
                yield _sse(body)
        if include_usage:
            usage = generation.usage(completion_tokens)
            yield _sse({**chunk_header, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): nothing more is generated
        generation.abort()


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _completion_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    offsets, at = [], 0
    for item in items:
        offsets.append(at)
        at += len(item.token)
    return {
        "tokens": [i.token for i in items],
        "token_logprobs": [i.logprob for i in items],
        "top_logprobs": [i.top for i in items],
        "text_offset": offsets,
    }


def _chat_logprobs(items: list[TokenLogprob]) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {
        "content": [
            {
                **entry(i.token, i.logprob),
                "top_logprobs": [entry(t, lp) for t, lp in i.top.items()],
            }
            for i in items
        ]
    }
