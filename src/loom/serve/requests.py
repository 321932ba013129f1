"""The OpenAI request bodies and their validation, in one place: a request either becomes a
`Job` the engine can run, or an `APIError` in OpenAI's error body; a bad request never
reaches the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

from loom.core.chat import ChatTemplate
from loom.core.errors import LoomError
from loom.serve.engine import Engine, SamplingParams
from loom.serve.responses import CHAT, COMPLETION, APIError, ResponseForm

MAX_N = 16
MAX_STOP = 4


class BaseRequest(BaseModel):
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


class CompletionRequest(BaseRequest):
    prompt: str | Annotated[list[int], Field(min_length=1)]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart]


class ChatRequest(BaseRequest):
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


@dataclass
class Job:
    """A validated request: the prompt's token ids, one SamplingParams per choice, the
    adapter (-1: the base model) and the shape of the answer."""

    prompt: list[int]
    params: list[SamplingParams]
    adapter: int
    form: ResponseForm


class RequestValidator:
    """Turns request bodies into Jobs, checking what pydantic's schema cannot (the model name,
    token ids, stops, the context length). Checks run in the order clients see errors."""

    def __init__(self, engine: Engine, served: ServedModel, default_chat_tokens: int) -> None:
        self.engine, self.served, self.default_chat_tokens = engine, served, default_chat_tokens

    def completion(self, req: CompletionRequest) -> Job:
        adapter = self.adapter_of(req.model)
        if req.echo:
            raise APIError(400, "echo is not supported by loom serve", "echo")
        if isinstance(req.prompt, str):
            prompt = self.served.tokenizer.encode(req.prompt).ids
        else:
            prompt = req.prompt
            vocab = self.served.tokenizer.get_vocab_size()
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        if not prompt:
            raise APIError(400, "the prompt is empty after tokenization", "prompt")
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        self.check_length(prompt, max_tokens)
        return Job(prompt, self.sampling(req, max_tokens, req.logprobs), adapter, COMPLETION)

    def chat(self, req: ChatRequest) -> Job:
        adapter = self.adapter_of(req.model)
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
            text = self.served.template.render(messages, add_generation_prompt=True)
        except LoomError as e:
            raise APIError(400, str(e), "messages") from None
        prompt = self.served.tokenizer.encode(text, add_special_tokens=False).ids
        limit = req.max_completion_tokens or req.max_tokens
        room = self.served.context - len(prompt)
        max_tokens = limit if limit is not None else max(min(self.default_chat_tokens, room), 1)
        self.check_length(prompt, max_tokens)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        return Job(prompt, self.sampling(req, max_tokens, logprobs), adapter, CHAT)

    def adapter_of(self, model: str) -> int:
        if model == self.served.name:
            return -1
        if model in self.served.adapters:
            return self.served.adapters[model]
        known = ", ".join([self.served.name, *self.served.adapters])
        raise APIError(
            400,
            f"model {model!r} is not served here; use one of: {known}",
            "model",
            "model_not_found",
        )

    def check_length(self, prompt: list[int], max_tokens: int) -> None:
        try:
            self.engine.check_fits(len(prompt), max_tokens)
        except LoomError as e:
            raise APIError(400, str(e), "max_tokens", "context_length_exceeded") from None

    @staticmethod
    def sampling(req: BaseRequest, max_tokens: int, logprobs: int | None) -> list[SamplingParams]:
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported by loom serve; leave it at 0", name)
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop holds {len(stops)} strings; at most {MAX_STOP}", "stop")
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", "stop")
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
