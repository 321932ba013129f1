"""The OpenAI HTTP API over the engine: /v1/models, /v1/completions, /v1/chat/completions
(server-sent events when `stream`), plus /health and /metrics.

Errors use OpenAI's body (`{"error": {"message", "type", "param", "code"}}`) so clients raise
their usual exceptions; a bad request never reaches the engine (see `requests`).
"""

from __future__ import annotations

import hmac
import time
import uuid
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
        generation = Generation(self.engine, job.prompt, job.params, job.adapter)
        generation.submit()
        response_id = job.form.id_prefix + uuid.uuid4().hex
        header = {"id": response_id, "created": int(time.time()), "model": req.model}
        if req.stream:
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                stream(generation, header, job.form, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        return JSONResponse(await collect(generation, request, header, job.form))


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    kind = "invalid_request_error" if e.status < 500 else "server_error"
    return JSONResponse(error_body(e.message, kind, e.param, e.code), status_code=e.status)


async def _invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    """pydantic's complaints as one OpenAI error: 400 for bad JSON, else 422 naming fields."""
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


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    message = str(e.detail)
    if e.status_code == 400:  # FastAPI could not read the body (e.g. invalid UTF-8)
        message = f"the request body is not valid JSON in UTF-8 ({message})"
    return JSONResponse(error_body(message, "invalid_request_error"), status_code=e.status_code)


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
