"""The OpenAI HTTP API over the engine: /v1/models, /v1/completions, /v1/chat/completions
(server-sent events when `stream`), plus /health and /metrics.

Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`) so clients raise
their usual exceptions; a bad request never reaches the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from tokenizers import Tokenizer

from loom.core.chat import ChatTemplate
from loom.core.errors import LoomError
from loom.serve.engine import Engine, QueueFull, SamplingParams, Sequence, SequenceEvent
from loom.serve.metrics import ServeMetrics

MAX_N = 16
MAX_STOP = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(message: str, kind: str, param: str | None = None, code: str = "") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code or None}}


class _Request(BaseModel):
    """Fields shared by both endpoints; unknown fields are ignored, as OpenAI's server does."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream_options: dict[str, Any] | None = None


class CompletionRequest(_Request):
    prompt: str | Annotated[list[int], Field(min_length=1)]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]


class ChatRequest(_Request):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=5)


@dataclass
class ServedModel:
    """What the server answers for: the base model and any adapters (by name)."""

    name: str
    tokenizer: Tokenizer
    template: ChatTemplate
    context: int
    adapters: dict[str, int]  # served name → adapter index of the engine's model


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop holds {len(stops)} strings; at most {MAX_STOP}", "stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", "stop")
    return stops


def _unsupported(req: _Request) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise APIError(400, f"{name} is not supported by loom serve; leave it at 0", name)


class AuthorizeAndCount:
    """ASGI middleware: the API key check, and request counts and latencies per endpoint
    (measured to the last byte, so a stream counts its whole duration). Plain ASGI, not
    Starlette's BaseHTTPMiddleware, which hides client disconnects from the endpoints."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: ServeMetrics) -> None:
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        began = time.perf_counter()
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path != "/health":
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                    refusal = JSONResponse(
                        error_body(
                            "missing or wrong API key: send 'Authorization: Bearer <key>'",
                            "invalid_request_error",
                            code="invalid_api_key",
                        ),
                        status_code=401,
                    )
                    await refusal(scope, receive, send_and_note)
                    return
            await self.app(scope, receive, send_and_note)
        finally:
            if path.startswith("/v1/"):
                self.metrics.requests.labels(path, str(status)).inc()
                self.metrics.request_latency.labels(path).observe(time.perf_counter() - began)


def create_app(
    engine: Engine,
    served: ServedModel,
    metrics: ServeMetrics,
    api_key: str | None = None,
    default_chat_tokens: int = 512,
) -> FastAPI:
    app = FastAPI(title="loom serve", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return JSONResponse(error_body(e.message, kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON in UTF-8: " + str(first.get("ctx", ""))
            return JSONResponse(error_body(message, "invalid_request_error"), status_code=400)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()) if p != 'body')}: {err.get('msg')}"
            for err in e.errors()[:5]
        )
        return JSONResponse(
            error_body(problems, "invalid_request_error", where or None), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = str(e.detail)
        if e.status_code == 400:  # FastAPI could not read the body (e.g. invalid UTF-8)
            message = f"the request body is not valid JSON in UTF-8 ({message})"
        return JSONResponse(error_body(message, "invalid_request_error"), status_code=e.status_code)

    app.add_middleware(AuthorizeAndCount, api_key=api_key, metrics=metrics)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        names = [served.name, *served.adapters]
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": created, "owned_by": "loom"} for n in names
            ],
        }

    def adapter_of(model: str) -> int:
        if model == served.name:
            return -1
        if model in served.adapters:
            return served.adapters[model]
        known = ", ".join([served.name, *served.adapters])
        raise APIError(
            400,
            f"model {model!r} is not served here; use one of: {known}",
            "model",
            "model_not_found",
        )

    def sampling(req: _Request, max_tokens: int, logprobs: int | None) -> list[SamplingParams]:
        _unsupported(req)
        stops = _stops(req.stop)
        return [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                seed=None if req.seed is None else req.seed + i,
                stop=stops,
                logprobs=logprobs,
            )
            for i in range(req.n)
        ]

    def check_length(prompt: list[int], max_tokens: int) -> None:
        try:
            engine.check_fits(len(prompt), max_tokens)
        except LoomError as e:
            raise APIError(400, str(e), "max_tokens", "context_length_exceeded") from None

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        adapter = adapter_of(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported by loom serve", "echo")
        if isinstance(req.prompt, str):
            prompt = served.tokenizer.encode(req.prompt).ids
        else:
            prompt = req.prompt
            vocab = served.tokenizer.get_vocab_size()
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        if not prompt:
            raise APIError(400, "the prompt is empty after tokenization", "prompt")
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        check_length(prompt, max_tokens)
        params = sampling(req, max_tokens, req.logprobs)
        return await run(request, req, prompt, params, adapter, "text_completion")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Response:
        adapter = adapter_of(req.model)
        messages = [
            {
                "role": m.role,
                "content": m.content
                if isinstance(m.content, str)
                else "".join(p.text for p in m.content),
            }
            for m in req.messages
        ]
        try:
            text = served.template.render(messages, add_generation_prompt=True)
        except LoomError as e:
            raise APIError(400, str(e), "messages") from None
        prompt = served.tokenizer.encode(text, add_special_tokens=False).ids
        limit = req.max_completion_tokens or req.max_tokens
        max_tokens = (
            limit
            if limit is not None
            else max(min(default_chat_tokens, served.context - len(prompt)), 1)
        )
        check_length(prompt, max_tokens)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = sampling(req, max_tokens, logprobs)
        return await run(request, req, prompt, params, adapter, "chat.completion")

    async def run(
        request: Request,
        req: _Request,
        prompt: list[int],
        params: list[SamplingParams],
        adapter: int,
        kind: str,
    ) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, SequenceEvent]] = asyncio.Queue()

        def deliver(index: int) -> Callable[[SequenceEvent], None]:
            def put(event: SequenceEvent) -> None:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))

            return put

        sequences = [Sequence(prompt, p, deliver(i), adapter) for i, p in enumerate(params)]
        try:
            engine.submit(sequences)
        except QueueFull as e:
            raise APIError(429, str(e), code="queue_full") from None
        except LoomError as e:
            raise APIError(400, str(e)) from None
        response_id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        header = {"id": response_id, "created": int(time.time()), "model": req.model}
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                stream(queue, sequences, header, kind, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return JSONResponse(await collect(request, queue, sequences, header, kind))

    async def collect(
        request: Request,
        queue: asyncio.Queue[tuple[int, SequenceEvent]],
        sequences: list[Sequence],
        header: dict[str, Any],
        kind: str,
    ) -> dict[str, Any]:
        texts = [""] * len(sequences)
        logprobs: list[list] = [[] for _ in sequences]
        reasons: list[str | None] = [None] * len(sequences)
        completion_tokens = 0

        async def watch() -> None:
            """Stop the generation when the client goes away (checked every 0.1 s)."""
            while not await request.is_disconnected():
                await asyncio.sleep(0.1)
            engine.abort(sequences)

        watcher = asyncio.create_task(watch())
        try:
            while any(r is None for r in reasons):
                index, event = await queue.get()
                texts[index] += event.text
                logprobs[index] += event.logprobs
                if event.finish_reason is not None:
                    reasons[index] = event.finish_reason
                    completion_tokens += event.completion_tokens
        finally:  # done, or cancelled: nothing more is generated either way
            watcher.cancel()
            engine.abort(sequences)
        failed = [r for r in reasons if r in ("error", "abort")]
        if failed:
            raise APIError(500, "generation failed in the engine; see the server log")
        choices = []
        for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
            if kind == "text_completion":
                choice: dict[str, Any] = {
                    "index": i,
                    "text": text,
                    "logprobs": _completion_logprobs(logprobs[i])
                    if sequences[i].params.logprobs is not None
                    else None,
                }
            else:
                choice = {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": _chat_logprobs(logprobs[i])
                    if sequences[i].params.logprobs is not None
                    else None,
                }
            choice["finish_reason"] = reason
            choices.append(choice)
        prompt_tokens = len(sequences[0].prompt_ids)
        return {
            **header,
            "object": kind,
            "choices": choices,
            "usage": _usage(prompt_tokens, completion_tokens),
        }

    async def stream(
        queue: asyncio.Queue[tuple[int, SequenceEvent]],
        sequences: list[Sequence],
        header: dict[str, Any],
        kind: str,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        chunk_kind = kind if kind == "text_completion" else "chat.completion.chunk"
        open_choices = set(range(len(sequences)))
        completion_tokens = 0
        try:
            if kind == "chat.completion":
                for i in range(len(sequences)):
                    delta = {"role": "assistant", "content": ""}
                    yield _sse(
                        {
                            **header,
                            "object": chunk_kind,
                            "choices": [
                                {
                                    "index": i,
                                    "delta": delta,
                                    "logprobs": None,
                                    "finish_reason": None,
                                }
                            ],
                        }
                    )
            while open_choices:
                index, event = await queue.get()
                if event.finish_reason in ("error", "abort"):
                    yield _sse(error_body("generation failed in the engine", "server_error"))
                    engine.abort(sequences)
                    return
                if event.finish_reason is not None:
                    open_choices.discard(index)
                    completion_tokens += event.completion_tokens
                if not event.text and event.finish_reason is None:
                    continue
                wants_logprobs = sequences[index].params.logprobs is not None
                if kind == "text_completion":
                    choice: dict[str, Any] = {
                        "index": index,
                        "text": event.text,
                        "logprobs": _completion_logprobs(event.logprobs)
                        if wants_logprobs
                        else None,
                    }
                else:
                    choice = {
                        "index": index,
                        "delta": {"content": event.text} if event.text else {},
                        "logprobs": _chat_logprobs(event.logprobs) if wants_logprobs else None,
                    }
                choice["finish_reason"] = event.finish_reason
                body: dict[str, Any] = {**header, "object": chunk_kind, "choices": [choice]}
                if include_usage:
                    body["usage"] = None
                yield _sse(body)
            if include_usage:
                usage = _usage(len(sequences[0].prompt_ids), completion_tokens)
                yield _sse({**header, "object": chunk_kind, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (or we are done): nothing more is generated
            engine.abort(sequences)

    return app


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _completion_logprobs(items: list) -> dict[str, Any]:
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


def _chat_logprobs(items: list) -> dict[str, Any]:
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
