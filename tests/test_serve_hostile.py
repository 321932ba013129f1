"""`loom serve` under hostile input and load, as a real process over HTTP.

Every request the server cannot serve gets a 4xx with OpenAI's error body, never a 500 or a
hang: a table of known bad requests (each of which gave a 500, or failed every request in the
engine's batch, before), the same through the official `openai` client, a `hypothesis` fuzz
of both endpoints' bodies (right and wrong types, extreme numbers, NaN, lone surrogates, raw
bytes), and 256 concurrent clients.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from conftest import TEST_VOCAB, save_tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import KEY, Server

from loom.core.chat import CHATML_TEMPLATE

MODEL = "tiny-llama"
CONTEXT = 64  # a short context: any valid fuzzed request generates little
AUTH = {"Authorization": f"Bearer {KEY}"}
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"


@pytest.fixture(scope="module")
def model_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / MODEL
    save_tiny_llama(folder, tokenizer_dir, max_positions=CONTEXT)
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    return folder


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[Server]:
    # The default --max-queue (256): 256 clients asking one answer each all fit.
    srv = Server(model_dir, "--api-key", KEY, "--max-batch", "32", "--kv-cache-mb", "16")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client:
        yield client


def post(http: httpx.Client, path: str, body: object) -> httpx.Response:
    """POST a body as JSON the way any client may: ASCII escapes (so lone surrogates travel
    as "\\ud800"), NaN and Infinity as Python's json writes them; bytes are sent as they are."""
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http.post(path, content=content, headers={"Content-Type": "application/json"})


def assert_openai_error(response: httpx.Response) -> dict[str, Any]:
    """A 4xx whose body is exactly OpenAI's error object; returns that object."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == "invalid_request_error", error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def assert_answer(response: httpx.Response) -> None:
    """A 200 that is a whole answer: a JSON completion, or an event stream ending in [DONE]."""
    assert response.status_code == 200, response.text
    if response.headers["content-type"].startswith("text/event-stream"):
        events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
        assert events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(event) for event in events[:-1]]
        assert all("error" not in chunk for chunk in chunks), chunks
        choices = [choice for chunk in chunks for choice in chunk["choices"]]
        finished = {c["index"] for c in choices if c["finish_reason"] in ("stop", "length")}
        assert finished and finished == {c["index"] for c in choices}, choices
        return
    body = response.json()
    assert body["object"] in ("text_completion", "chat.completion"), body
    assert body["choices"] and all(
        c["finish_reason"] in ("stop", "length") for c in body["choices"]
    )


GOOD = {"model": MODEL, "prompt": "def parse(", "max_tokens": 4}
CHAT_GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def comp(**fields: object) -> dict[str, object]:
    return {**GOOD, **fields}


def chat(**fields: object) -> dict[str, object]:
    return {**CHAT_GOOD, **fields}


def says(content: object, role: str = "user") -> list[dict[str, object]]:
    return [{"role": role, "content": content}]


TOO_DEEP = b'{"a":' * 3000 + b"1" + b"}" * 3000
TOO_LONG_INT = b'{"model": "tiny-llama", "prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}"
IMAGE = [{"type": "image_url", "image_url": {"url": "x"}}]
TOOLS = [{"type": "function", "function": {"name": "f"}}]

# (endpoint, body, status, a piece of the message, param). The first nine gave a 500 before.
BAD: list[tuple[str, object, int, str, str | None]] = [
    (COMPLETIONS, comp(seed=2**70), 400, "seed 1180591620717411303424 is out of range", "seed"),
    (COMPLETIONS, comp(seed=-(2**64)), 400, "out of range; use an integer from", "seed"),
    (CHAT, chat(seed=2**64), 400, "is out of range", "seed"),
    (COMPLETIONS, comp(stream=True, seed=2**70), 400, "out of range", "seed"),
    (
        COMPLETIONS,
        comp(prompt="ab\ud800"),
        400,
        "lone surrogate '\\ud800' at character 2",
        "prompt",
    ),
    (
        COMPLETIONS,
        b'{"model": "tiny-llama", "prompt": "\\udc00"}',
        400,
        "not valid Unicode",
        "prompt",
    ),
    (CHAT, chat(messages=says("\udfff")), 400, "not valid Unicode", "messages[0].content"),
    (
        CHAT,
        chat(messages=says([{"type": "text", "text": "\ud800"}])),
        400,
        "not valid Unicode",
        "messages[0].content",
    ),
    (COMPLETIONS, comp(stop=["ok", "\ud800"]), 400, "not valid Unicode", "stop[1]"),
    # the rest were 4xx already, or 200 for requests loom serve cannot honour
    (COMPLETIONS, comp(max_tokens=2**70), 400, "beyond the model's context of 64", "max_tokens"),
    (COMPLETIONS, comp(prompt="word " * 100), 400, "beyond the model's context", "prompt"),
    (CHAT, chat(messages=says("word " * 100), max_tokens=None), 400, "context of 64", "messages"),
    (COMPLETIONS, comp(n=2**70), 422, "n: Input should be less than or equal to 16", "n"),
    (
        COMPLETIONS,
        comp(logprobs=2**70),
        422,
        "logprobs: Input should be less than or equal",
        "logprobs",
    ),
    (CHAT, chat(logprobs=True, top_logprobs=10**30), 422, "top_logprobs", "top_logprobs"),
    (
        COMPLETIONS,
        b'{"model": "tiny-llama", "prompt": "x", "temperature": NaN}',
        422,
        "temperature: Input should be a finite number",
        "temperature",
    ),
    (
        COMPLETIONS,
        b'{"model": "tiny-llama", "prompt": "x", "top_p": -Infinity}',
        422,
        "top_p: Input should be a finite number",
        "top_p",
    ),
    (
        COMPLETIONS,
        comp(max_tokens=True),
        422,
        "max_tokens: Input should be a valid integer",
        "max_tokens",
    ),
    (
        COMPLETIONS,
        comp(temperature="0.5"),
        422,
        "temperature: Input should be a valid number",
        "temperature",
    ),
    (COMPLETIONS, comp(stream="yes"), 422, "stream: Input should be a valid boolean", "stream"),
    (
        COMPLETIONS,
        comp(stream_options={"include_usage": 1}),
        422,
        "stream_options.include_usage",
        "stream_options.include_usage",
    ),
    (COMPLETIONS, comp(prompt=[[1, 2], [3]]), 400, "one per request", "prompt"),
    (COMPLETIONS, comp(prompt=[1, True]), 400, "list of token ids (integers)", "prompt"),
    (COMPLETIONS, comp(prompt=[TEST_VOCAB]), 400, "token ids must be in [0, 512)", "prompt"),
    (COMPLETIONS, comp(stop=["a"] * 1000), 400, "stop holds 1000 strings; at most 4", "stop"),
    (COMPLETIONS, comp(best_of=3), 400, "best_of is not supported", "best_of"),
    (COMPLETIONS, comp(logit_bias={"1": 100}), 400, "logit_bias is not supported", "logit_bias"),
    (CHAT, chat(messages=[]), 422, "messages: List should have at least 1 item", "messages"),
    (
        CHAT,
        chat(messages=says("x", role="wizard")),
        422,
        "messages[0].role: Input should be",
        "messages[0].role",
    ),
    (
        CHAT,
        chat(messages=says(7)),
        422,
        "messages[0].content: Input should be a valid string",
        "messages[0].content",
    ),
    (
        CHAT,
        chat(messages=says(None, role="assistant")),
        400,
        "messages[0].content is missing",
        "messages[0].content",
    ),
    (
        CHAT,
        chat(messages=says(IMAGE)),
        400,
        "'image_url' part; loom serve takes only text parts",
        "messages[0].content[0]",
    ),
    (
        CHAT,
        chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "g"}}),
        400,
        "tool_choice names the function 'g', which tools do not define",
        "tool_choice",
    ),
    (
        CHAT,
        chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": 1}}),
        422,
        "response_format.json_schema.schema: Input should be a valid dictionary",
        "response_format.json_schema.schema",
    ),
    (
        CHAT,
        chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "x"}},
            }
        ),
        400,
        "cannot be enforced: Invalid type: x",
        "response_format.json_schema.schema",
    ),
    (COMPLETIONS, b"[]", 422, "must be a JSON object sent as application/json", None),
    (COMPLETIONS, TOO_LONG_INT, 400, "not valid JSON", None),
    (COMPLETIONS, TOO_DEEP, 400, "not valid JSON", None),
]


def test_known_bad_requests_get_openai_errors_naming_the_field(
    server: Server, http: httpx.Client
) -> None:
    for path, body, status, message, param in BAD:
        response = post(http, path, body)
        assert response.status_code == status, (
            body if len(str(body)) < 200 else path,
            response.text,
        )
        error = assert_openai_error(response)
        assert message in error["message"], (error, message)
        assert error["param"] == param, (error, param)
    context = post(http, COMPLETIONS, {**GOOD, "max_tokens": 100})
    assert assert_openai_error(context)["code"] == "context_length_exceeded"
    assert server.metric('loom_requests_total{endpoint="/v1/completions",status="5') == 0
    assert server.metric('loom_requests_total{endpoint="/v1/chat/completions",status="5') == 0


def test_what_the_schema_lets_through_is_served(http: httpx.Client) -> None:
    """Nulls mean the default (as OpenAI's API takes them), the int64 seeds all work, and
    seeds near the top wrap around for n > 1."""
    nulls = {"temperature": None, "top_p": None, "n": None, "stream": None, "stop": None}
    assert_answer(post(http, COMPLETIONS, {**GOOD, **nulls, "seed": None, "logprobs": None}))
    assert_answer(post(http, CHAT, {**CHAT_GOOD, **nulls, "logprobs": None, "top_logprobs": None}))
    for seed in (-(2**63), -1, 2**63 - 1, 2**64 - 1):
        assert_answer(post(http, COMPLETIONS, {**GOOD, "seed": seed, "n": 3}))
    parts = [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]
    joined = {**CHAT_GOOD, "messages": [{"role": "user", "content": parts}], "temperature": 0}
    plain = {**CHAT_GOOD, "temperature": 0}
    assert post(http, CHAT, joined).json()["choices"] == post(http, CHAT, plain).json()["choices"]


def test_a_vanishing_temperature_or_top_p_samples_greedily_without_failing_the_batch(
    http: httpx.Client, server: Server
) -> None:
    """temperature 1e-300 overflowed float32 and top_p 1e-320 dropped every token: the
    engine's step failed and with it every sequence in the batch (500s for bystanders)."""
    greedy = {**GOOD, "max_tokens": 12, "temperature": 0}
    expected = post(http, COMPLETIONS, greedy).json()["choices"][0]["text"]
    extremes = [{"temperature": 1e-300}, {"temperature": 5e-324}, {"top_p": 1e-320}]

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=120) as client:
            bystanders = [
                client.post(COMPLETIONS, json={**GOOD, "max_tokens": 24}) for _ in range(4)
            ]
            tiny = [
                client.post(
                    COMPLETIONS, json={**greedy, **e, "temperature": e.get("temperature", 1.0)}
                )
                for e in extremes
            ]
            return await asyncio.gather(*bystanders, *tiny)

    responses = asyncio.run(together())
    for response in responses:
        assert_answer(response)
    assert [r.json()["choices"][0]["text"] for r in responses[4:]] == [expected] * 3
    assert server.metric('loom_finished_sequences_total{reason="error"}') == 0


def test_the_openai_client_raises_bad_request_errors(server: Server) -> None:
    client = server.client(max_retries=0)
    too_long = "context_length_exceeded"
    cases: list[tuple[dict[str, Any], str, str | None, str]] = [
        ({"prompt": "x", "seed": 2**70}, "out of range; use an integer from", None, "seed"),
        ({"prompt": "x", "max_tokens": 10**6}, "model's context of 64", too_long, "max_tokens"),
        ({"prompt": [1, 2, 3] * 30}, "shorten the prompt", too_long, "prompt"),
        ({"prompt": "x", "stop": list("abcde")}, "at most 4", None, "stop"),
        ({"prompt": ["one", "two"]}, "one per request", None, "prompt"),
        ({"prompt": "x", "logit_bias": {"5": 1}}, "is not supported", None, "logit_bias"),
    ]  # fmt: skip
    for kwargs, message, code, param in cases:
        with pytest.raises(openai.BadRequestError, match=message) as raised:
            client.completions.create(model=MODEL, **kwargs)
        assert (raised.value.code, raised.value.param) == (code, param)
    long_chat = [{"role": "user", "content": "word " * 100}]
    with pytest.raises(openai.BadRequestError, match="context of 64") as raised:
        client.chat.completions.create(model=MODEL, messages=long_chat)
    assert (raised.value.code, raised.value.param) == ("context_length_exceeded", "messages")
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
    with pytest.raises(openai.BadRequestError, match="only text parts"):
        client.chat.completions.create(model=MODEL, messages=image)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="is not served here"):
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.completions.create(model=MODEL, prompt="x", temperature=3)


# -- the fuzz -------------------------------------------------------------------------------

TEXT = st.text(st.characters(categories=["L", "M", "N", "P", "S", "Z", "Cc"]), max_size=12)
# ... and with lone surrogates (category Cs), which JSON can carry but UTF-8 cannot.
ODD_TEXT = st.text(
    st.characters(categories=["L", "M", "N", "P", "S", "Z", "Cc", "Cs"]), max_size=12
)
EXTREME_INTS = st.sampled_from(
    [0, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30]
)
INTS = st.integers() | EXTREME_INTS
FLOATS = st.floats() | st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 2.0, 2.0000001, 1e308])
ANY_JSON = st.recursive(
    st.none() | st.booleans() | INTS | FLOATS | ODD_TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ODD_TEXT, inner, max_size=3),
    max_leaves=6,
)
ROLES = st.sampled_from(["system", "user", "assistant", "tool", "developer"])
PART = st.fixed_dictionaries(
    {"type": st.just("text") | st.sampled_from(["image_url", "input_audio"]) | ANY_JSON},
    optional={"text": TEXT | ODD_TEXT | ANY_JSON},
)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES | ANY_JSON, "content": TEXT | ODD_TEXT | st.lists(PART, max_size=3) | ANY_JSON},
    optional={"name": ODD_TEXT},
)
GOOD_MESSAGE = st.fixed_dictionaries({"role": ROLES, "content": TEXT})

# Each field: (a good value, an odd one: extreme or of the wrong type).
SAMPLING: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "max_tokens": (st.integers(1, 6) | st.none(), INTS),
    "temperature": (st.floats(0, 2) | st.none(), FLOATS),
    "top_p": (st.floats(0, 1, exclude_min=True) | st.none(), FLOATS),
    "n": (st.integers(1, 3) | st.none(), INTS),
    "stream": (st.booleans(), ANY_JSON),
    "stream_options": (
        st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        ANY_JSON,
    ),
    "stop": (
        TEXT.filter(bool) | st.lists(TEXT.filter(bool), max_size=4),
        ODD_TEXT | st.lists(ODD_TEXT, max_size=6),
    ),
    "seed": (st.integers(-(2**63), 2**64 - 1) | st.none(), INTS),
    "presence_penalty": (st.just(0.0), FLOATS),
    "user": (TEXT, ODD_TEXT),
    "unknown_field": (ANY_JSON, ANY_JSON),
}
COMPLETION_FIELDS = {
    "model": (st.just(MODEL), ODD_TEXT),
    "prompt": (
        TEXT.filter(str.strip) | st.lists(st.integers(0, TEST_VOCAB - 1), min_size=1, max_size=8),
        ODD_TEXT | st.lists(INTS, max_size=3),
    ),
    **SAMPLING,
    "logprobs": (st.integers(0, 5) | st.none(), INTS),
    "echo": (st.just(False), ANY_JSON),
}
CHAT_FIELDS = {
    "model": (st.just(MODEL), ODD_TEXT),
    "messages": (st.lists(GOOD_MESSAGE, min_size=1, max_size=3), st.lists(MESSAGE, max_size=4)),
    **SAMPLING,
    "max_completion_tokens": (st.integers(1, 6), INTS),
    "logprobs": (st.booleans(), ANY_JSON),
    "top_logprobs": (st.integers(0, 5), INTS),
    "tools": (st.just([]), ANY_JSON),
    "response_format": (st.just({"type": "text"}), ANY_JSON),
}
REQUIRED = ("model", "prompt", "messages")


@st.composite
def bodies(draw: st.DrawFn, fields: dict[str, tuple[st.SearchStrategy[Any], ...]]) -> dict:
    """A good body (the required fields and some optional ones), then up to three fields
    made odd or dropped: most bodies are a few steps from a request that is served."""
    body = {
        name: draw(good)
        for name, (good, _) in fields.items()
        if name in REQUIRED or draw(st.booleans())
    }
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        if name in REQUIRED and draw(st.integers(0, 9)) == 0:
            body.pop(name, None)
        else:
            body[name] = draw(fields[name][1] | ANY_JSON)
    return body


# Bytes that are not JSON, or JSON cut short (one request in four).
RAW = st.binary(max_size=40) | bodies(COMPLETION_FIELDS).map(lambda b: json.dumps(b).encode()[:-2])


def one_in_four_raw(body: st.SearchStrategy[dict]) -> st.SearchStrategy[dict | bytes]:
    return st.integers(0, 3).flatmap(lambda k: RAW if k == 0 else body)


REQUESTS = st.tuples(st.just(COMPLETIONS), one_in_four_raw(bodies(COMPLETION_FIELDS))) | st.tuples(
    st.just(CHAT), one_in_four_raw(bodies(CHAT_FIELDS))
)


def test_fuzzed_bodies_get_answers_or_openai_4xx_and_the_server_lives_on(
    server: Server, http: httpx.Client
) -> None:
    seen: dict[int, int] = {}

    @settings(
        max_examples=200,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(REQUESTS)
    def fuzz(request: tuple[str, object]) -> None:
        path, body = request
        response = post(http, path, body)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        if response.status_code == 200:
            assert_answer(response)
        else:
            assert_openai_error(response)

    fuzz()
    # The fuzz reached generation and each kind of refusal, not only one early check.
    assert seen.get(200, 0) >= 20 and seen.get(400, 0) >= 20 and seen.get(422, 0) >= 20, seen
    assert_answer(post(http, COMPLETIONS, GOOD))
    assert_answer(post(http, CHAT, CHAT_GOOD))
    for path in (COMPLETIONS, CHAT):
        assert server.metric(f'loom_requests_total{{endpoint="{path}",status="5') == 0
    assert server.metric('loom_finished_sequences_total{reason="error"}') == 0


# -- load -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_256_concurrent_clients_are_all_answered(server: Server, http: httpx.Client) -> None:
    """256 clients at once (a quarter streaming, a third chatting), 4 tokens each: every one
    gets its whole answer (the default --max-queue of 256 holds them all); then 256 clients
    asking 4 answers each overflow the queue, and those refused get OpenAI's 429."""

    def body(i: int, n: int) -> tuple[str, dict[str, Any]]:
        common = {"model": MODEL, "max_tokens": 4, "n": n, "stream": i % 4 == 0}
        if i % 3 == 0:
            return CHAT, {**common, "messages": [{"role": "user", "content": f"task {i}"}]}
        return COMPLETIONS, {**common, "prompt": f"def f{i}("}

    async def flood(n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(
            base_url=server.url, headers=AUTH, timeout=300, limits=limits
        ) as client:
            return await asyncio.gather(
                *[client.post(path, json=b) for path, b in (body(i, n) for i in range(256))]
            )

    responses = asyncio.run(flood(1))
    for i, response in enumerate(responses):
        assert_answer(response)
        if i % 4:  # whole answers: at most 4 tokens each
            assert response.json()["usage"]["completion_tokens"] <= 4
    crowded = asyncio.run(flood(4))
    refused = [r for r in crowded if r.status_code == 429]
    for response in crowded:
        if response.status_code == 429:
            assert assert_openai_error(response)["code"] == "queue_full"
            assert "retry later" in response.json()["error"]["message"]
        else:
            assert_answer(response)
    # The queue was full before the first refusal: 64 requests' 256 sequences were served.
    assert len(crowded) - len(refused) >= 64, len(refused)
    assert_answer(post(http, COMPLETIONS, GOOD))
