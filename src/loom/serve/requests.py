"""The OpenAI request bodies and their validation, in one place: a request either becomes a
`Job` the engine can run, or an `APIError` in OpenAI's error body; a bad request never
reaches the engine.

The schema is strict about JSON types (no `true` for a number, no `"5"` for an integer, no
NaN or infinity) and takes `null` for an optional field as its default, as OpenAI does. Wrong
types and out-of-range fields are pydantic's 422s; what the schema cannot see (the model name,
token ids, invalid Unicode, seeds, the context, JSON schemas llguidance cannot enforce) is
checked here and answered with 400."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from tokenizers import Tokenizer

from loom.core.chat import ChatTemplate
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.serve.engine import Engine, SamplingParams, TokenConstraint
from loom.serve.responses import CHAT, COMPLETION, APIError, ChatForm, ResponseForm
from loom.serve.structured import ANY_OBJECT, FUNCTION_NAME, NO_PARAMETERS, Grammars, ToolSpec

MAX_N = 16
MAX_STOP = 4
MAX_LOGPROBS = 5
# torch.Generator takes seeds in [-2**63, 2**64); choice i of a request is seeded seed + i,
# wrapped into that range (so every seed OpenAI accepts, the int64 range, works).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# Below this a temperature (or top_p) keeps only the most likely token: sampled as greedy, since
# dividing the logits by a smaller temperature overflows float32 (and a top_p below float32's
# smallest number drops every token) and would fail the engine's whole step.
GREEDY_BELOW = 1e-6
ANSWER_SCHEMA = "response_format.json_schema.schema"  # the field, in error messages


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = None


class JsonSchemaFormat(BaseModel):
    """response_format's `json_schema`: the schema the answer must follow (always enforced;
    `strict` is accepted and changes nothing)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: StrictStr
    description: StrictStr | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class BaseRequest(BaseModel):
    """Fields shared by both endpoints; unknown fields are ignored, as OpenAI's server does,
    except the ones below that ask for something loom serve cannot do (refused with 400)."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: StrictStr
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1)
    n: StrictInt | None = Field(default=None, ge=1, le=MAX_N)
    stream: StrictBool | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    stream_options: StreamOptions | None = None
    # Not supported: any value but the default is refused (see RequestValidator.unsupported).
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    logit_bias: Any = None
    functions: Any = None
    response_format: ResponseFormat | None = None


class CompletionRequest(BaseRequest):
    prompt: StrictStr | list[Any]
    tools: Any = None  # chat only
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: StrictBool | None = None
    best_of: Any = None
    suffix: Any = None


class ContentPart(BaseModel):
    """One part of a message's content array (only `text` parts are served)."""

    model_config = ConfigDict(extra="ignore")

    type: StrictStr
    text: StrictStr | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class MessageToolCall(BaseModel):
    """A call an assistant message made earlier in the conversation."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages
    tool_call_id: StrictStr | None = None  # tool messages: the call they answer


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: NamedFunction


class ChatRequest(BaseRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None


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
    adapter (-1: the base model), the shape of the answer, and what constrains each choice's
    tokens (a fresh grammar matcher per choice; None: nothing)."""

    prompt: list[int]
    params: list[SamplingParams]
    adapter: int
    form: ResponseForm
    constraint: Callable[[], TokenConstraint] | None = None


@dataclass
class ToolRequest:
    """A chat request's checked tools: what the prompt shows, what the answer is parsed for,
    and the grammar the answer must follow (None: free text)."""

    shown: list[dict[str, Any]] | None  # OpenAI's tool objects, for the chat template
    names: set[str]  # calls to these are parsed from the answer (empty: none)
    grammar: str | None


class RequestValidator:
    """Turns request bodies into Jobs, checking what pydantic's schema cannot (the model name,
    token ids, stops, the context length). Checks run in the order clients see errors."""

    def __init__(self, engine: Engine, served: ServedModel, default_chat_tokens: int) -> None:
        self.engine, self.served, self.default_chat_tokens = engine, served, default_chat_tokens
        self.grammars = Grammars(served.tokenizer, engine.stop_ids)

    def completion(self, req: CompletionRequest) -> Job:
        adapter = self.adapter_of(req.model)
        self.unsupported(req)
        if req.echo:
            raise APIError(400, "echo is not supported by loom serve; leave it false", "echo")
        if req.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported by loom serve; use n", "best_of")
        if req.suffix:
            raise APIError(400, "suffix (insertion) is not supported by loom serve", "suffix")
        if req.tools:
            raise APIError(
                400, "tools are for /v1/chat/completions; leave them out of a completion", "tools"
            )
        params = self.sampling(req, req.logprobs)
        grammar = self.answer_grammar(req.response_format)
        if isinstance(req.prompt, str):
            check_unicode(req.prompt, "prompt")
            prompt = self.served.tokenizer.encode(req.prompt).ids
        else:
            prompt = self.token_ids(req.prompt)
        if not prompt:
            raise APIError(400, "the prompt is empty after tokenization; send some text", "prompt")
        max_tokens = req.max_tokens if req.max_tokens is not None else 16
        self.check_length(prompt, max_tokens, "prompt")
        return Job(
            prompt, params.with_max_tokens(max_tokens), adapter, COMPLETION, self.grammar(grammar)
        )

    def chat(self, req: ChatRequest) -> Job:
        adapter = self.adapter_of(req.model)
        self.unsupported(req)
        params = self.sampling(req, (req.top_logprobs or 0) if req.logprobs else None)
        tools = self.tools(req)
        messages = [chat_message(m, i) for i, m in enumerate(req.messages)]
        try:
            text = self.served.template.render_with_tools(
                messages, tools.shown, add_generation_prompt=True
            )
        except LoomError as e:
            raise APIError(400, str(e), "messages") from None
        except Exception as e:  # the model's own template code, failing on these messages
            logger.warning("the chat template failed: %s: %s", type(e).__name__, e)
            raise APIError(
                400,
                f"the model's chat template cannot render these messages "
                f"({type(e).__name__}: {_clip(str(e))}); change the roles or their order",
                "messages",
            ) from None
        check_unicode(text, "messages")  # tool calls' and tools' text included
        prompt = self.served.tokenizer.encode(text, add_special_tokens=False).ids
        limit = req.max_completion_tokens or req.max_tokens
        room = self.served.context - len(prompt)
        max_tokens = limit if limit is not None else max(min(self.default_chat_tokens, room), 1)
        self.check_length(prompt, max_tokens, "messages")
        form = ChatForm(tools.names) if tools.names else CHAT
        return Job(
            prompt, params.with_max_tokens(max_tokens), adapter, form, self.grammar(tools.grammar)
        )

    def answer_grammar(self, response_format: ResponseFormat | None) -> str | None:
        """The grammar a response_format asks for (None for text)."""
        schema = self.answer_schema(response_format)
        if schema is None:
            return None
        return self.grammars.answer_grammar(schema, ANSWER_SCHEMA)

    @staticmethod
    def answer_schema(response_format: ResponseFormat | None) -> dict[str, Any] | None:
        """The JSON schema of the answer: any object for json_object, None for text."""
        if response_format is None or response_format.type == "text":
            return None
        if response_format.type == "json_object":
            return ANY_OBJECT
        spec = response_format.json_schema
        if spec is None or spec.schema_ is None:
            where = "response_format.json_schema" + ("" if spec is None else ".schema")
            raise APIError(
                400,
                f"{where} is missing: a json_schema response_format needs "
                '{"json_schema": {"name": ..., "schema": {...}}}; or use {"type": "json_object"}',
                where,
            )
        if not FUNCTION_NAME.match(spec.name):
            raise APIError(
                400,
                f"response_format.json_schema.name {_clip(repr(spec.name))} must be 1-64 "
                "letters, digits, underscores or dashes",
                "response_format.json_schema.name",
            )
        return spec.schema_

    def tools(self, req: ChatRequest) -> ToolRequest:
        """The request's tools, tool_choice and response_format, checked: "none" hides the
        tools from the model, "auto" lets it choose (with a response_format: that JSON, or
        calls), "required" and a named function constrain the answer to calls."""
        answer = self.answer_schema(req.response_format)
        answer_grammar = None
        if answer is not None:
            answer_grammar = self.grammars.answer_grammar(answer, ANSWER_SCHEMA)
        choice = req.tool_choice if req.tool_choice is not None else "auto"
        specs = [self.tool_spec(tool, i) for i, tool in enumerate(req.tools or [])]
        if not specs and (choice == "required" or isinstance(choice, NamedToolChoice)):
            raise APIError(
                400,
                "tool_choice asks for a tool call but the request defines no tools; send tools, "
                "or leave tool_choice out",
                "tool_choice",
            )
        if not specs or choice == "none":
            return ToolRequest(None, set(), answer_grammar)
        names = [s.name for s in specs]
        if len(set(names)) < len(names):
            twice = next(n for n in names if names.count(n) > 1)
            raise APIError(
                400, f"tools define {twice!r} twice; give each function its own name", "tools"
            )
        shown = [tool.model_dump(exclude_none=True) for tool in req.tools or []]
        check_unicode(json.dumps(shown, ensure_ascii=False), "tools")
        parallel = req.parallel_tool_calls is not False
        if isinstance(choice, NamedToolChoice):
            if choice.function.name not in names:
                raise APIError(
                    400,
                    f"tool_choice names the function {_clip(repr(choice.function.name))}, which "
                    f"tools do not define; use one of: {', '.join(names)}",
                    "tool_choice",
                )
            grammar = self.grammars.tool_grammar([specs[names.index(choice.function.name)]], False)
        elif choice == "required":
            grammar = self.grammars.tool_grammar(specs, parallel)
        elif answer is not None:
            grammar = self.grammars.tool_grammar(specs, parallel, answer)
        else:
            grammar = None
        return ToolRequest(shown, set(names), grammar)

    def tool_spec(self, tool: Tool, index: int) -> ToolSpec:
        """A tool's function, its name and parameters checked (even when it is not called:
        a bad schema is the client's bug either way)."""
        name = tool.function.name
        if not FUNCTION_NAME.match(name):
            raise APIError(
                400,
                f"tools[{index}].function.name {_clip(repr(name))} must be 1-64 letters, "
                "digits, underscores or dashes",
                f"tools[{index}].function.name",
            )
        parameters = (
            dict(NO_PARAMETERS) if tool.function.parameters is None else tool.function.parameters
        )
        self.grammars.answer_grammar(parameters, f"tools[{index}].function.parameters")
        return ToolSpec(name, parameters)

    def grammar(self, grammar: str | None) -> Callable[[], TokenConstraint] | None:
        """A new matcher per choice over a checked grammar."""
        if grammar is None:
            return None
        return lambda: self.grammars.constraint(grammar)

    def adapter_of(self, model: str) -> int:
        if model == self.served.name:
            return -1
        if model in self.served.adapters:
            return self.served.adapters[model]
        known = ", ".join([self.served.name, *self.served.adapters])
        raise APIError(
            400,
            f"model {_clip(repr(model))} is not served here; use one of: {known}",
            "model",
            "model_not_found",
        )

    def token_ids(self, prompt: list[Any]) -> list[int]:
        """A prompt given as token ids: integers in the vocabulary."""
        if any(isinstance(t, str | list) for t in prompt):
            raise APIError(
                400,
                "prompt holds several prompts; loom serve takes one per request (a string or "
                "a list of token ids): send one request per prompt",
                "prompt",
            )
        if any(type(t) is not int for t in prompt):
            raise APIError(
                400, "prompt must be a string or a list of token ids (integers)", "prompt"
            )
        vocab = self.served.tokenizer.get_vocab_size()
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
        return prompt

    def check_length(self, prompt: list[int], max_tokens: int, field: str) -> None:
        """OpenAI's context-length error (400, code context_length_exceeded); its param is
        the prompt when the prompt alone fills the context, else max_tokens."""
        try:
            self.engine.check_fits(len(prompt), max_tokens)
        except LoomError as e:
            param = field if len(prompt) >= self.served.context else "max_tokens"
            raise APIError(400, str(e), param, "context_length_exceeded") from None

    @staticmethod
    def unsupported(req: BaseRequest) -> None:
        """Refuse options loom serve cannot honour (their defaults are accepted)."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name):
                raise APIError(400, f"{name} is not supported by loom serve; leave it at 0", name)
        if req.logit_bias:
            raise APIError(
                400, "logit_bias is not supported by loom serve; leave it out", "logit_bias"
            )
        if req.functions:
            raise APIError(
                400,
                "functions (deprecated by OpenAI) is not supported by loom serve; send them as "
                'tools: [{"type": "function", "function": {...}}]',
                "functions",
            )

    def sampling(self, req: BaseRequest, logprobs: int | None) -> Sampling:
        """The sampling settings shared by a request's choices (max_tokens comes later)."""
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop holds {len(stops)} strings; at most {MAX_STOP}", "stop")
        if any(not s for s in stops):
            raise APIError(400, "stop strings must not be empty", "stop")
        for i, stop in enumerate(stops):
            check_unicode(stop, "stop" if isinstance(req.stop, str) else f"stop[{i}]")
        if req.seed is not None and not SEED_MIN <= req.seed <= SEED_MAX:
            raise APIError(
                400,
                f"seed {_clip(str(req.seed))} is out of range; use an integer from "
                f"{SEED_MIN} to {SEED_MAX}",
                "seed",
            )
        n = req.n if req.n is not None else 1
        if n > self.engine.config.max_queue:
            raise APIError(
                400,
                f"n={n} is more than the server queues at once (--max-queue "
                f"{self.engine.config.max_queue}); lower n",
                "n",
            )
        temperature = req.temperature if req.temperature is not None else 1.0
        top_p = req.top_p if req.top_p is not None else 1.0
        if temperature < GREEDY_BELOW or top_p < GREEDY_BELOW:
            temperature, top_p = 0.0, 1.0
        return Sampling(n, temperature, top_p, req.seed, stops, logprobs)


@dataclass
class Sampling:
    """A request's checked sampling settings; one SamplingParams per choice."""

    n: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    logprobs: int | None

    def with_max_tokens(self, max_tokens: int) -> list[SamplingParams]:
        return [
            SamplingParams(
                max_tokens=max_tokens,
                temperature=self.temperature,
                top_p=self.top_p,
                seed=None if self.seed is None else (self.seed + i) % 2**64,
                stop=self.stop,
                logprobs=self.logprobs,
            )
            for i in range(self.n)
        ]


def chat_message(message: ChatMessage, index: int) -> dict[str, Any]:
    """A message as the chat template takes it: its text, and an assistant's tool calls
    (arguments as objects, as HF templates expect) or the id of the call a tool answers."""
    out: dict[str, Any] = {"role": message.role}
    if message.role == "assistant" and message.tool_calls:
        out["content"] = "" if message.content is None else message_text(message, index)
        calls = []
        for j, call in enumerate(message.tool_calls):
            where = f"messages[{index}].tool_calls[{j}].function.arguments"
            try:
                arguments = json.loads(call.function.arguments)
            except (ValueError, RecursionError):
                raise APIError(
                    400,
                    f"{where} is not JSON; send the arguments as a JSON object in a string",
                    where,
                ) from None
            function = {"name": call.function.name, "arguments": arguments}
            calls.append({"id": call.id, "type": "function", "function": function})
        out["tool_calls"] = calls
        return out
    out["content"] = message_text(message, index)
    if message.role == "tool" and message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None and message.role == "tool":
        out["name"] = message.name
    return out


def message_text(message: ChatMessage, index: int) -> str:
    """A message's content as one string (text parts joined); other parts are refused."""
    where = f"messages[{index}].content"
    if message.content is None:
        raise APIError(
            400,
            f"{where} is missing; loom serve needs text content (or tool_calls, in an "
            "assistant message)",
            where,
        )
    if isinstance(message.content, str):
        text = message.content
    else:
        texts = []
        for j, part in enumerate(message.content):
            if part.type != "text":
                raise APIError(
                    400,
                    f"{where}[{j}] is a {_clip(repr(part.type))} part; loom serve takes only "
                    "text parts",
                    f"{where}[{j}]",
                )
            if part.text is None:
                raise APIError(
                    400, f"{where}[{j}] has no 'text'; give the part its text", f"{where}[{j}]"
                )
            texts.append(part.text)
        text = "".join(texts)
    check_unicode(text, where)
    return text


def check_unicode(text: str, where: str) -> None:
    """Refuse text that is not valid Unicode: JSON can escape lone surrogates ("\\ud800"),
    which no tokenizer or UTF-8 encoder accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400,
            f"{where} is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
            f"{e.start}; send UTF-8 text (surrogates only as pairs)",
            where,
        ) from None


def _clip(text: str, limit: int = 80) -> str:
    """A client's value quoted in an error message, at most `limit` characters."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
