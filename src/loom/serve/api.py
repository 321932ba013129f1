"""The OpenAI HTTP API over the engine: /v1/models, /v1/completions, /v1/chat/completions
(server-sent events when `stream`), plus /health and /metrics.

Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`) so clients raise
their usual exceptions; a bad request never reaches the engine (see `requests`).
"""

from __future__ import annotations

import hmac
import json
import re
import time
import uuid
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loom.serve.engine import Engine
from loom.serve.metrics import ServeMetrics
from loom.serve.requests import (
    BaseRequest,
    ChatRequest,
    CompletionRequest,
    Job,
    RequestValidator,
    ServedModel,
)
from loom.serve.responses import APIError, Generation, collect, error_body, stream


class ServingApp:
    """The FastAPI app of `loom serve`: its routes are this class's methods, request checks
    live in `RequestValidator`, answers (whole or streamed) in `responses`."""

    def __init__(
        self,
        engine: Engine,
        served: ServedModel,
        metrics: ServeMetrics,
        api_key: str | None = None,
        default_chat_tokens: int = 512,
    ) -> None:
        self.engine, self.served, self.metrics = engine, served, metrics
        self.validator = RequestValidator(engine, served, default_chat_tokens)
        self.app = app = FastAPI(title="loom serve", docs_url=None, redoc_url=None)
        app.add_exception_handler(APIError, _api_error)  # type: ignore[arg-type]
        app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
        app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
        app.add_exception_handler(Exception, _internal_error)
        app.add_middleware(AuthorizeAndCount, api_key=api_key, metrics=metrics)
        app.add_api_route("/health", self.health, methods=["GET"])
        app.add_api_route("/metrics", self.prometheus, methods=["GET"])
        app.add_api_route("/v1/models", self.models, methods=["GET"])
        app.add_api_route("/v1/completions", self.completions, methods=["POST"])
        app.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])

    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self) -> dict[str, Any]:
        created = int(time.time())
        names = [self.served.name, *self.served.adapters]
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": created, "owned_by": "loom"} for n in names
            ],
        }

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        return await self.answer(request, req, self.validator.completion(req))

    async def chat(self, req: ChatRequest, request: Request) -> Response:
        return await self.answer(request, req, self.validator.chat(req))

    async def answer(self, request: Request, req: BaseRequest, job: Job) -> Response:
        """Submit the job; answer with one body, or with a stream when the client asked."""
        generation = Generation(self.engine, job.prompt, job.params, job.adapter, job.constraint)
        generation.submit()
        response_id = job.form.id_prefix + uuid.uuid4().hex
        header = {"id": response_id, "created": int(time.time()), "model": req.model}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                stream(generation, header, job.form, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return JSONResponse(await collect(generation, request, header, job.form))


class ErrorResponse(JSONResponse):
    """An error body in ASCII JSON: it may quote a client's text, lone surrogates included,
    which UTF-8 cannot encode."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode()


async def _api_error(request: Request, e: APIError) -> ErrorResponse:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return ErrorResponse(error_body(e.message, kind, e.param, e.code), status_code=e.status)


async def _invalid_request(request: Request, e: RequestValidationError) -> ErrorResponse:
    """pydantic's complaints as one OpenAI error: 400 for bad JSON, else 422 naming fields."""
    errors = e.errors() or [{"loc": (), "msg": "the request body is not valid"}]
    if errors[0].get("type") == "json_invalid":
        message = "the request body is not valid JSON in UTF-8: " + str(errors[0].get("ctx", ""))
        return ErrorResponse(error_body(message, "invalid_request_error"), status_code=400)
    problems = "; ".join(_problem(err) for err in errors[:5])
    param = _field(errors[0].get("loc", ())) or None
    return ErrorResponse(error_body(problems, "invalid_request_error", param), status_code=422)


def _problem(error: dict[str, Any]) -> str:
    where = _field(error.get("loc", ()))
    if not where:  # the body itself: not an object, or not sent as JSON
        return (
            f"the request body must be a JSON object sent as application/json ({error.get('msg')})"
        )
    return f"{where}: {error.get('msg')}"


def _field(loc: Sequence[object]) -> str:
    """pydantic's error location as the field's name in the body (`messages[0].content`),
    without the union branch pydantic tried (`str`, `list[ContentPart]`, `NamedToolChoice`,
    ...)."""
    where = ""
    for part in loc:
        if isinstance(part, int):
            where += f"[{part}]"
        elif part != "body" and not _UNION_BRANCH.match(str(part)):
            where += f".{part}" if where else str(part)
    return where


# A branch of a union: a type (`str`, `list[...]`, `literal[...]`) or a model's class name (the
# API's field names are all lower case).
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|[\w-]+\[.*\]|[A-Z][A-Za-z0-9]*)$")


async def _http_error(request: Request, e: StarletteHTTPException) -> ErrorResponse:
    message = str(e.detail)
    if e.status_code == 400:  # FastAPI could not read the body (e.g. invalid UTF-8)
        message = f"the request body is not valid JSON in UTF-8 ({message})"
    return ErrorResponse(error_body(message, "invalid_request_error"), status_code=e.status_code)


async def _internal_error(request: Request, e: Exception) -> ErrorResponse:
    """A bug, not a bad request: still OpenAI's body (the traceback goes to the log)."""
    message = f"internal error ({type(e).__name__}); see the server log"
    return ErrorResponse(error_body(message, "server_error"), status_code=500)


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
                    refusal = ErrorResponse(
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
