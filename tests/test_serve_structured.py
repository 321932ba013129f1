"""Structured output and tools of `loom serve`, through the official `openai` client against a
real server.

The served model is a tiny random Llama: left alone it writes garbage, never JSON, so every
answer that parses and follows its schema here does so because the grammar allowed nothing
else. Answers are checked with `jsonschema`, greedy and sampled (temperature 1, several seeds),
whole and streamed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
import transformers
from conftest import save_tiny_llama
from test_serve import KEY, Server
from tokenizers import Tokenizer

from loom.core.chat import CHATML_TEMPLATE, ChatTemplate
from loom.core.tokenizer import EOS
from loom.serve.tool_calls import ToolCall, ToolCallParser, split_tool_calls

MODEL = "tiny-llama"
CHAT = "/v1/chat/completions"
ASK = [{"role": "user", "content": "Describe it as JSON."}]
SEEDS = (1, 2, 3, 4, 5)
MAX_TOKENS = 160  # every schema below is complete well before this
MAX_CALL_TOKENS = 100  # one call of any tool below is complete well before this

PERSON = {  # required fields, bounded string and integer
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PALETTE = {  # enums, an array of them
    "type": "object",
    "properties": {
        "mode": {"enum": ["light", "dark"]},
        "colors": {
            "type": "array",
            "items": {"enum": ["red", "green", "blue"]},
            "minItems": 1,
            "maxItems": 3,
        },
    },
    "required": ["mode", "colors"],
    "additionalProperties": False,
}
SHAPE = {  # nesting, numbers, booleans, null, anyOf, $ref (numbers are bounded: unbounded,
    # the random model writes digits until max_tokens)
    "type": "object",
    "properties": {
        "center": {"$ref": "#/$defs/point"},
        "radius": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.25},
        "filled": {"type": "boolean"},
        "label": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]},
    },
    "required": ["center", "radius", "filled", "label"],
    "additionalProperties": False,
    "$defs": {
        "point": {
            "type": "object",
            "properties": {
                "x": {"type": "integer", "minimum": -9, "maximum": 9},
                "y": {"type": "integer", "minimum": -9, "maximum": 9},
            },
            "required": ["x", "y"],
            "additionalProperties": False,
        }
    },
}
SCHEMAS = {"person": PERSON, "palette": PALETTE, "shape": SHAPE}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {  # (a $ref: the parameters are a JSON document of their own)
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {
                "terms": {
                    "type": "array",
                    "items": {"$ref": "#/$defs/term"},
                    "minItems": 2,
                    "maxItems": 3,
                }
            },
            "required": ["terms"],
            "additionalProperties": False,
            "$defs": {"term": {"type": "integer", "minimum": 0, "maximum": 99}},
        },
    },
}
NOW = {"type": "function", "function": {"name": "now"}}  # no parameters: arguments {}
TOOLS = [WEATHER, ADD, NOW]
PARAMETERS = {
    "get_weather": WEATHER["function"]["parameters"],
    "add": ADD["function"]["parameters"],
    "now": {"type": "object", "properties": {}, "additionalProperties": False},
}


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a ChatML template (which knows no tools: they are rendered
    in the Hermes format) whose end of text is the tokenizer's."""
    folder = tmp_path_factory.mktemp("structured") / MODEL
    save_tiny_llama(folder, tokenizer_dir, max_positions=2048)
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    eos = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(EOS)
    generation = json.loads((folder / "generation_config.json").read_text())
    generation.update(eos_token_id=eos, bos_token_id=None, pad_token_id=eos)
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    # One thread: the tiny model gains nothing from two, and on a busy 2-core machine two
    # threads waiting on each other made the same requests 5 to 40 times slower.
    srv = Server(model_dir, "--api-key", KEY, "--max-batch", "64", env={"OMP_NUM_THREADS": "1"})
    yield srv
    srv.stop()


def json_schema(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def assert_follows(text: str | None, schema: dict[str, Any]) -> Any:
    assert text is not None
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def ask_all(server: Server, requests: list[dict[str, Any]]) -> list[Any]:
    """Chat requests sent together (the engine batches them), answered in order."""

    async def send() -> list[Any]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY)
        return await asyncio.gather(*[client.chat.completions.create(**r) for r in requests])

    return asyncio.run(send())


def whole_and_streamed(server: Server, request: dict[str, Any]) -> tuple[Any, list[Any]]:
    """One request asked whole and streamed, together: the answer and the stream's chunks."""

    async def send() -> tuple[Any, list[Any]]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY)

        async def chunks() -> list[Any]:
            return [c async for c in await client.chat.completions.create(**request, stream=True)]

        return await asyncio.gather(client.chat.completions.create(**request), chunks())

    return asyncio.run(send())


def test_answers_follow_their_json_schema_greedy_and_sampled(server: Server) -> None:
    requests = []
    for name, schema in SCHEMAS.items():
        common = dict(model=MODEL, messages=ASK, response_format=json_schema(name, schema))
        requests.append({**common, "temperature": 0, "max_tokens": MAX_TOKENS})
        requests += [
            {**common, "temperature": 1, "seed": seed, "n": 3, "max_tokens": MAX_TOKENS}
            for seed in SEEDS
        ]
    requests.append({"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": 40})
    *answers, free = ask_all(server, requests)
    per_schema = 1 + len(SEEDS)
    for i, (name, schema) in enumerate(SCHEMAS.items()):
        mine = answers[i * per_schema : (i + 1) * per_schema]
        choices = [c for answer in mine for c in answer.choices]
        assert len(choices) == 1 + 3 * len(SEEDS)
        for choice in choices:
            assert choice.finish_reason == "stop", (name, choice.message.content)
            assert_follows(choice.message.content, schema)
        assert len({c.message.content for c in choices}) > 3, name  # really sampled
    # The same request unconstrained: the model's own answer is no JSON at all.
    with pytest.raises(ValueError):
        json.loads(free.choices[0].message.content)


def test_completions_take_a_response_format_too(server: Server) -> None:
    got = server.client().completions.create(
        model=MODEL,
        prompt="def palette():\n    return ",
        max_tokens=MAX_TOKENS,
        temperature=1,
        seed=4,
        n=3,
        extra_body={"response_format": json_schema("palette", PALETTE)},
    )
    for choice in got.choices:
        assert choice.finish_reason == "stop"
        assert_follows(choice.text, PALETTE)


def test_json_object_answers_are_json_objects(server: Server) -> None:
    """Any object will do, so the random model writes long keys and values: answers that
    end by themselves are objects; `max_tokens` may cut the others (finish_reason length)."""
    got = server.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format={"type": "json_object"},
        temperature=1,
        seed=6,
        n=8,
        max_tokens=80,
    )
    ended = [c for c in got.choices if c.finish_reason == "stop"]
    assert len(ended) >= 2, [c.message.content for c in got.choices]
    for choice in got.choices:
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length"


def test_max_tokens_cuts_a_json_answer_with_finish_reason_length(server: Server) -> None:
    got = server.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format=json_schema("person", PERSON),
        temperature=0,
        max_tokens=3,
    )
    choice = got.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content.startswith('{"')  # the start of the only valid answer
    with pytest.raises(ValueError):
        json.loads(choice.message.content)
    whole = server.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        response_format=json_schema("person", PERSON),
        temperature=0,
        max_tokens=MAX_TOKENS,
    )
    assert whole.choices[0].message.content.startswith(choice.message.content)


def test_the_clients_parse_helper_fills_a_pydantic_model(server: Server) -> None:
    """The official client's `parse` sends a pydantic model as a strict json_schema and
    validates the answer into it."""

    class Person(pydantic.BaseModel):
        name: Annotated[str, pydantic.Field(max_length=10)]
        age: Annotated[int, pydantic.Field(ge=0, le=120)]
        tags: Annotated[list[Literal["a", "b"]], pydantic.Field(max_length=2)]

    got = server.client().chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Person, temperature=1, seed=3, n=3
    )
    for choice in got.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)
        assert 0 <= choice.message.parsed.age <= 120


def test_a_streamed_json_answer_equals_the_whole_one(server: Server) -> None:
    whole, chunks = whole_and_streamed(
        server,
        dict(
            model=MODEL,
            messages=ASK,
            response_format=json_schema("shape", SHAPE),
            temperature=1,
            seed=11,
            max_tokens=MAX_TOKENS,
        ),
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 5
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert_follows(streamed, SHAPE)


def assert_calls(message: Any, names: set[str]) -> list[tuple[str, dict[str, Any]]]:
    """The message's tool calls as (name, arguments), each checked against its function."""
    assert message.content is None
    assert message.tool_calls
    calls = []
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, PARAMETERS[call.function.name])
        calls.append((call.function.name, arguments))
    assert len({call.id for call in message.tool_calls}) == len(message.tool_calls)
    return calls


def test_required_and_named_tool_calls_follow_the_parameters(server: Server) -> None:
    names = {tool["function"]["name"] for tool in TOOLS}
    common = dict(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=MAX_CALL_TOKENS)
    required = [
        {**common, "tool_choice": "required", "temperature": 1, "seed": seed, "n": 3}
        for seed in SEEDS
    ]
    named = [
        {**common, "tool_choice": {"type": "function", "function": {"name": n}}, "temperature": 0}
        for n in sorted(names)
    ]
    single = {**common, "tool_choice": "required", "parallel_tool_calls": False, "n": 4, "seed": 3}
    answers = ask_all(server, [*required, *named, single])
    called: set[str] = set()
    for choice in [c for answer in answers[: len(required)] for c in answer.choices]:
        if choice.finish_reason == "length":  # (parallel calls: the model may go on)
            continue
        assert choice.finish_reason == "tool_calls"
        called |= {name for name, _ in assert_calls(choice.message, names)}
    assert called == names  # every function was called at least once
    for name, answer in zip(sorted(names), answers[len(required) : -1], strict=True):
        assert answer.choices[0].finish_reason == "tool_calls"
        assert [n for n, _ in assert_calls(answer.choices[0].message, names)] == [name]
    for choice in answers[-1].choices:
        assert choice.finish_reason == "tool_calls"
        assert len(assert_calls(choice.message, names)) == 1


def test_streamed_tool_calls_reassemble_to_the_whole_answer(server: Server) -> None:
    request: dict[str, Any] = dict(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=1,
        seed=2,
        n=2,
        max_tokens=MAX_CALL_TOKENS,
    )
    whole, chunks = whole_and_streamed(server, request)
    calls: dict[tuple[int, int], dict[str, str]] = {}
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault((choice.index, delta.index), {"arguments": ""})
                if delta.id:
                    assert "id" not in call
                    call.update(id=delta.id, name=delta.function.name)
                call["arguments"] += delta.function.arguments or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    for choice in whole.choices:
        assert finish[choice.index] == choice.finish_reason
        expected = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        got = [
            (call["name"], call["arguments"])
            for (index, _), call in sorted(calls.items())
            if index == choice.index
        ]
        assert got == expected
        assert all(call["id"].startswith("call_") for call in calls.values())


def test_auto_with_a_response_format_answers_json_or_calls(server: Server) -> None:
    """tool_choice "auto" with a response_format: the answer is that JSON, or tool calls;
    either way it parses into the right field."""
    got = server.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        response_format=json_schema("person", PERSON),
        parallel_tool_calls=False,
        temperature=1,
        seed=8,
        n=8,
        max_tokens=MAX_CALL_TOKENS,
    )
    kinds = set()
    for choice in got.choices:
        if choice.finish_reason == "tool_calls":
            assert_calls(choice.message, {"get_weather"})
            kinds.add("calls")
        else:
            assert choice.finish_reason == "stop" and not choice.message.tool_calls
            assert_follows(choice.message.content, PERSON)
            kinds.add("answer")
    assert kinds == {"calls", "answer"}


def test_tool_calls_are_split_from_text_as_it_streams() -> None:
    """Under "auto" the model may write text around its calls: streamed in pieces of any
    size, the text outside well-formed calls is content (a partial tag held back until it is
    not one), and the pieces join to what the whole answer gives."""
    call = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    other = '<tool_call>\n{"name": "now", "arguments": {"x": [1]}}\n</tool_call>'
    text = (
        f"Let me check <tool_ <b>\n{call}\n"
        '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>\n'
        f"{other}\n\n<tool_c"
    )
    content, calls = split_tool_calls(text, {"now"})
    assert content == (
        "Let me check <tool_ <b>\n\n"
        '<tool_call>\n{"name": "unknown", "arguments": {}}\n</tool_call>\n\n\n<tool_c'
    )
    assert [(c.name, c.arguments) for c in calls] == [("now", "{}"), ("now", '{"x": [1]}')]
    for size in (1, 2, 5, 13):
        parser = ToolCallParser({"now"})
        pieces: list[str | ToolCall] = []
        for at in range(0, len(text), size):
            pieces += parser.feed(text[at : at + size])
            assert not any(isinstance(p, str) and p.endswith("<tool") for p in pieces)
        pieces += parser.finish()
        assert "".join(p for p in pieces if isinstance(p, str)) == content
        assert [(c.name, c.arguments) for c in pieces if isinstance(c, ToolCall)] == [
            (c.name, c.arguments) for c in calls
        ]
    # Only whitespace around the calls: no content at all.
    assert split_tool_calls(f"\n{call}\n{call}\n", {"now"})[0] is None


CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Weather in Oslo and Bergen?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"city": "Oslo", "unit": "celsius"}',
                },
            },
            {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 3}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "noon"},
    {"role": "user", "content": "Thanks."},
]
# The conversation above in the Hermes format (as Qwen2.5's template writes it), by hand.
TOOLS_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    f"{json.dumps(WEATHER)}\n{json.dumps(NOW)}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)
CONVERSATION_TEXT = (
    "<|im_start|>system\nYou help.{tools}<|im_end|>\n"
    "<|im_start|>user\nWeather in Oslo and Bergen?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Oslo", '
    '"unit": "celsius"}}}}\n</tool_call>\n<tool_call>\n{{"name": "now", "arguments": {{}}}}\n'
    "</tool_call><|im_end|>\n"
    '<|im_start|>user\n<tool_response>\n{{"temp": 3}}\n</tool_response>\n<tool_response>\nnoon\n'
    "</tool_response><|im_end|>\n"
    "<|im_start|>user\nThanks.<|im_end|>\n<|im_start|>assistant\n"
)


def hf_messages(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI's messages as HF chat templates take them: tool call arguments as objects."""
    out = []
    for message in conversation:
        calls = [
            {
                **c,
                "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])},
            }
            for c in message.get("tool_calls") or []
        ]
        out.append({**message, "tool_calls": calls} if calls else message)
    return out


def test_tools_and_tool_messages_are_rendered_in_the_hermes_format(
    server: Server, model_dir: Path
) -> None:
    """A template without tools (ChatML here, SmolLM2's) gets them in the Hermes format; the
    server accepts assistant tool_calls and tool results and prompts the model with exactly
    that text. tool_choice "none" hides the tools."""
    with_tools = CONVERSATION_TEXT.format(tools=TOOLS_PROMPT)
    template = ChatTemplate(CHATML_TEMPLATE, "test")
    assert not template.renders_tools
    assert template.render_with_tools(hf_messages(CONVERSATION), [WEATHER, NOW], True) == with_tools
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    client = server.client()
    got = client.chat.completions.create(
        model=MODEL, messages=CONVERSATION, tools=[WEATHER, NOW], max_tokens=2
    )
    assert got.usage.prompt_tokens == len(tokenizer.encode(with_tools).ids)
    hidden = client.chat.completions.create(
        model=MODEL, messages=CONVERSATION, tools=[WEATHER, NOW], tool_choice="none", max_tokens=2
    )
    without = CONVERSATION_TEXT.format(tools="")
    assert hidden.usage.prompt_tokens == len(tokenizer.encode(without).ids)
    assert hidden.choices[0].message.tool_calls is None


# A template with a tool format of its own (any; this one is made up): tools reach it as they
# reach it in transformers.
NATIVE_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}"
    "{{ (t.function.parameters or {}) | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[{{ c.function.name }} {{ c.function.arguments | tojson }}]"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_with_its_own_tool_format_renders_like_transformers(
    tokenizer_dir: Path, tmp_path: Path
) -> None:
    for file in tokenizer_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    (tmp_path / "chat_template.jinja").write_text(NATIVE_TEMPLATE)
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
                }
            ],
        },
        {"role": "tool", "content": "3 degrees"},
    ]
    template = ChatTemplate.from_tokenizer_dir(tmp_path)
    assert template.renders_tools
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert template.render_with_tools(messages, TOOLS, True) == reference
    assert "get_weather" in reference and "<tool_call>" not in reference


def bad(body: dict[str, Any]) -> dict[str, Any]:
    return {"model": MODEL, "messages": ASK, "max_tokens": 4, **body}


BROKEN = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(a"}}}
SCHEMA = "response_format.json_schema.schema"  # the field named in its errors
NAN_SCHEMA = (
    b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "response_format": '
    b'{"type": "json_schema", "json_schema": {"name": "x", "schema": {"maximum": NaN}}}}'
)
BAD_ARGUMENTS = [
    {
        "role": "assistant",
        "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{"}}
        ],
    }
]


def function(name: str, parameters: object = None) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


# (endpoint, body, status, a piece of the message, param)
BAD_REQUESTS: list[tuple[str, dict[str, Any] | bytes, int, str, str | None]] = [
    (
        CHAT,
        bad({"response_format": json_schema("x", {"type": "nonsense"})}),
        400,
        "Invalid type: nonsense",
        SCHEMA,
    ),
    (
        CHAT,
        bad({"response_format": json_schema("x", {"not": {}})}),
        400,
        "Unimplemented keys",
        SCHEMA,
    ),
    (
        CHAT,
        bad({"response_format": json_schema("x", BROKEN)}),
        400,
        "regex parse error: (a error: unclosed group",
        SCHEMA,
    ),
    (
        CHAT,
        bad({"response_format": json_schema("x", {"enum": ["\ud800"]})}),
        400,
        "not a valid JSON schema",
        SCHEMA,
    ),
    (CHAT, NAN_SCHEMA, 400, "it holds NaN or infinity", SCHEMA),
    (
        CHAT,
        bad({"response_format": {"type": "json_schema"}}),
        400,
        "json_schema is missing",
        "response_format.json_schema",
    ),
    (
        CHAT,
        bad({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
        400,
        "schema is missing",
        SCHEMA,
    ),
    (
        CHAT,
        bad({"response_format": json_schema("a b", PERSON)}),
        400,
        "must be 1-64 letters",
        "response_format.json_schema.name",
    ),
    (
        CHAT,
        bad({"response_format": {"type": "xml"}}),
        422,
        "response_format.type",
        "response_format.type",
    ),
    (
        CHAT,
        bad({"tools": [function("f", BROKEN)]}),
        400,
        "unclosed group",
        "tools[0].function.parameters",
    ),
    (
        CHAT,
        bad({"tools": [WEATHER, function("f", {"type": "x"})]}),
        400,
        "Invalid type: x",
        "tools[1].function.parameters",
    ),
    (
        CHAT,
        bad({"tools": [WEATHER], "tool_choice": named("add")}),
        400,
        "tools do not define; use one of: get_weather",
        "tool_choice",
    ),
    (CHAT, bad({"tool_choice": "required"}), 400, "defines no tools", "tool_choice"),
    (CHAT, bad({"tools": [WEATHER, WEATHER]}), 400, "define 'get_weather' twice", "tools"),
    (
        CHAT,
        bad({"tools": [named("no spaces")]}),
        400,
        "must be 1-64 letters",
        "tools[0].function.name",
    ),
    (
        CHAT,
        bad({"tools": [{"type": "function"}]}),
        422,
        "tools[0].function: Field required",
        "tools[0].function",
    ),
    (
        CHAT,
        bad({"tool_choice": "sometimes", "tools": [WEATHER]}),
        422,
        "tool_choice",
        "tool_choice",
    ),
    (
        CHAT,
        bad({"messages": BAD_ARGUMENTS}),
        400,
        "is not JSON",
        "messages[0].tool_calls[0].function.arguments",
    ),
    (CHAT, bad({"functions": [{"name": "f"}]}), 400, "send them as tools", "functions"),
    (
        "/v1/completions",
        {"model": MODEL, "prompt": "x", "tools": [WEATHER]},
        400,
        "tools are for /v1/chat",
        "tools",
    ),
]


def test_bad_schemas_and_tools_get_openai_errors_naming_the_field(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        for path, body, status, message, param in BAD_REQUESTS:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = http.post(
                path, content=content, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
            assert message in error["message"], (error, message)
            assert error["param"] == param, (error, param)
    client = server.client(max_retries=0)
    with pytest.raises(openai.BadRequestError, match="Invalid type: nonsense") as raised:
        client.chat.completions.create(
            model=MODEL, messages=ASK, response_format=json_schema("x", {"type": "nonsense"})
        )
    assert raised.value.param == "response_format.json_schema.schema"
    assert server.metric('loom_requests_total{endpoint="/v1/chat/completions",status="5') == 0
