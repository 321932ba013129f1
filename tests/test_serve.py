"""`loom serve` as a real process, spoken to by the official `openai` client and raw HTTP.

A tiny random Llama saved by `transformers` is served; greedy answers are checked against
`transformers`' own greedy generate on the same folder and against `loom generate` on the same
weights converted to a Loom run; 32 concurrent clients, streaming, stops, seeds, logprobs,
the API key, malformed requests and back-pressure are exercised over HTTP.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
import transformers
from conftest import free_port, save_tiny_llama

from loom.core.chat import CHATML_TEMPLATE
from loom.core.tokenizer import EOS
from loom.eval.generate import generate, load_for_generation
from loom.models.convert import convert

KEY = "test-key"
PROMPTS = [
    "def main():\n",
    "import os\nimport",
    "class Foo:\n    def",
    "x = 1\ny =",
    "for i in range(10):\n",
    "# a comment\n",
]


@pytest.fixture(scope="module")
def hf_dir(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved by transformers, with the test tokenizer, a ChatML template
    and a generation config whose end of text is the tokenizer's."""
    folder = tmp_path_factory.mktemp("served") / "tiny-llama"
    save_tiny_llama(folder, tokenizer_dir, max_positions=512)
    (folder / "chat_template.jinja").write_text(CHATML_TEMPLATE)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    eos = tokenizer.convert_tokens_to_ids(EOS)
    generation = json.loads((folder / "generation_config.json").read_text())
    generation.update(eos_token_id=eos, bos_token_id=None, pad_token_id=eos)
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.fixture(scope="module")
def reference(hf_dir: Path) -> tuple:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    return model, transformers.AutoTokenizer.from_pretrained(hf_dir)


def hf_greedy(reference: tuple, ids: list[int], max_new_tokens: int) -> list[int]:
    model, tok = reference
    eos = tok.convert_tokens_to_ids(EOS)
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    new = out[0, len(ids) :].tolist()
    return new[:-1] if new and new[-1] == eos else new


class Server:
    def __init__(self, model: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loom", "serve", str(model), "--port", str(self.port), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"loom serve exited: {self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("loom serve did not become healthy in 120 s")

    def client(self, key: str = KEY, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, **kwargs)

    def metric(self, name: str, key: str = KEY) -> float:
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {key}"}).text
        values = [
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)
        ]
        return sum(values)

    def stop(self) -> str:
        self.process.terminate()
        out, _ = self.process.communicate(timeout=30)
        return out


@pytest.fixture(scope="module")
def server(hf_dir: Path) -> Iterator[Server]:
    # Small blocks and steps: prompts are prefilled in several chunks, sequences span blocks.
    # Prompt-lookup speculation under every test of this server: answers, logprobs, stops and
    # streams are those of plain decoding.
    srv = Server(
        hf_dir,
        *("--api-key", KEY, "--max-batch", "16", "--step-tokens", "8", "--block-size", "4"),
        *("--speculate", "ngram"),
    )
    yield srv
    srv.stop()


def test_models_health_metrics_and_api_key(server: Server) -> None:
    client = server.client()
    assert [m.id for m in client.models.list()] == ["tiny-llama"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    with pytest.raises(openai.AuthenticationError, match="API key"):
        server.client(key="wrong").models.list()
    assert httpx.get(server.url + "/metrics").status_code == 401
    client.completions.create(model="tiny-llama", prompt="x", max_tokens=2)
    assert server.metric('loom_requests_total{endpoint="/v1/completions",status="200"}') >= 1
    assert server.metric("loom_time_to_first_token_seconds_count") >= 1
    assert server.metric("loom_generation_tokens_total") >= 1
    assert server.metric("loom_request_latency_seconds_count") >= 1


def test_greedy_equals_transformers_and_loom_generate(
    server: Server, hf_dir: Path, reference: tuple, tmp_path: Path
) -> None:
    convert(hf_dir, tmp_path / "run", "loom", "fp32")
    loom_model, _ = load_for_generation(tmp_path / "run", torch.device("cpu"))
    tok = reference[1]
    eos = tok.convert_tokens_to_ids(EOS)
    client = server.client()
    for prompt in PROMPTS[:3]:
        got = client.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=20, temperature=0
        )
        ids = tok.encode(prompt, add_special_tokens=False)
        expected = hf_greedy(reference, ids, 20)
        assert got.choices[0].text == tok.decode(expected)
        assert got.usage.prompt_tokens == len(ids)
        assert got.usage.completion_tokens == len(expected)
        assert generate(loom_model, ids, 20, temperature=0, stop_id=eos) == expected


def test_chat_uses_the_template_and_matches_transformers(server: Server, reference: tuple) -> None:
    messages = [
        {"role": "system", "content": "Answer in code."},
        {"role": "user", "content": "Write a loop."},
    ]
    got = server.client().chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=12, temperature=0
    )
    tok = reference[1]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(ids, add_special_tokens=False)
    assert got.usage.prompt_tokens == len(ids)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == tok.decode(hf_greedy(reference, ids, 12))


def test_a_conversation_resent_each_turn_reuses_its_cached_prefix(
    server: Server, reference: tuple
) -> None:
    """Each turn re-sends the conversation: its earlier turns' full KV blocks come from the
    prefix cache (counted in /metrics), and the answers stay transformers' greedy ones."""
    client, tok = server.client(), reference[1]
    messages = [{"role": "system", "content": "You answer in Python code, briefly. " * 4}]
    previous, previous_ids = 0, []  # the last turn's prompt
    for turn in ("Write a loop.", "Now a function.", "Add a docstring."):
        messages.append({"role": "user", "content": turn})
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok.encode(text, add_special_tokens=False)
        hits = server.metric("loom_prefix_cache_hit_tokens_total")
        got = client.chat.completions.create(
            model="tiny-llama", messages=messages, max_tokens=6, temperature=0
        )
        assert got.choices[0].message.content == tok.decode(hf_greedy(reference, ids, 6))
        reused = server.metric("loom_prefix_cache_hit_tokens_total") - hits
        assert ids[:previous] == previous_ids  # (the last prompt starts this one)
        assert reused >= previous // 4 * 4 - 4  # its full blocks of 4 (the last one may differ)
        previous, previous_ids = len(ids), ids
        messages.append({"role": "assistant", "content": got.choices[0].message.content})
    assert server.metric("loom_prefix_cache_query_tokens_total") >= len(ids)
    assert server.metric("loom_queue_seconds_count") >= 3


def test_streaming_equals_the_whole_answer(server: Server) -> None:
    client = server.client()
    whole = client.completions.create(
        model="tiny-llama", prompt=PROMPTS[3], max_tokens=24, temperature=0
    )
    chunks = list(
        client.completions.create(
            model="tiny-llama",
            prompt=PROMPTS[3],
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) > 2  # really streamed, not one blob
    assert "".join(texts) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    chat = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=10,
        temperature=0,
        stream=True,
    )
    deltas = list(chat)
    assert deltas[0].choices[0].delta.role == "assistant"
    assert deltas[-1].choices[0].finish_reason in ("stop", "length")
    streamed = "".join(d.choices[0].delta.content or "" for d in deltas)
    plain = client.chat.completions.create(
        model="tiny-llama",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=10,
        temperature=0,
    )
    assert streamed == plain.choices[0].message.content


def test_stop_sequences_cut_the_text(server: Server) -> None:
    client = server.client()
    full = (
        client.completions.create(
            model="tiny-llama", prompt=PROMPTS[4], max_tokens=30, temperature=0
        )
        .choices[0]
        .text
    )
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert len(stop) == 3
    expected = full[: full.index(stop)]
    got = client.completions.create(
        model="tiny-llama", prompt=PROMPTS[4], max_tokens=30, temperature=0, stop=[stop, "@@@"]
    )
    assert got.choices[0].text == expected
    assert got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="tiny-llama",
        prompt=PROMPTS[4],
        max_tokens=30,
        temperature=0,
        stop=stop,
        stream=True,
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_seeds_reproduce_samples_and_n_gives_distinct_choices(server: Server) -> None:
    client = server.client()

    def sample(seed: int) -> list[str]:
        got = client.completions.create(
            model="tiny-llama", prompt=PROMPTS[0], max_tokens=16, temperature=1.0, seed=seed, n=3
        )
        assert [c.index for c in got.choices] == [0, 1, 2]
        return [c.text for c in got.choices]

    first = sample(7)
    assert sample(7) == first
    assert len(set(first)) == 3
    assert sample(8) != first


def test_logprobs_are_the_models(server: Server, reference: tuple) -> None:
    model, tok = reference
    got = server.client().completions.create(
        model="tiny-llama", prompt=PROMPTS[1], max_tokens=6, temperature=0, logprobs=3
    )
    lp = got.choices[0].logprobs
    ids = tok.encode(PROMPTS[1], add_special_tokens=False)
    new = hf_greedy(reference, ids, 6)
    with torch.no_grad():
        logits = model(torch.tensor([ids + new])).logits[0].log_softmax(-1)
    for i, token in enumerate(new):
        expected = float(logits[len(ids) + i - 1, token])
        assert abs(lp.token_logprobs[i] - expected) < 1e-4
        assert lp.tokens[i] == tok.decode([token])
        assert len(lp.top_logprobs[i]) == 3
        assert max(lp.top_logprobs[i].values()) == pytest.approx(lp.token_logprobs[i], abs=1e-6)


def test_32_concurrent_clients_get_their_own_complete_answers(
    server: Server, reference: tuple
) -> None:
    tok = reference[1]
    prompts = [f"{PROMPTS[i % len(PROMPTS)]}{'z' * (i % 7)}{i}" for i in range(32)]
    lengths = [8 + (i * 5) % 17 for i in range(32)]

    async def ask_all() -> list[openai.types.Completion]:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=KEY)
        return await asyncio.gather(
            *[
                client.completions.create(model="tiny-llama", prompt=p, max_tokens=n, temperature=0)
                for p, n in zip(prompts, lengths, strict=True)
            ]
        )

    answers = asyncio.run(ask_all())
    for prompt, n, answer in zip(prompts, lengths, answers, strict=True):
        expected = hf_greedy(reference, tok.encode(prompt, add_special_tokens=False), n)
        assert answer.choices[0].text == tok.decode(expected)
        assert answer.usage.completion_tokens == len(expected)
    assert server.metric("loom_batch_occupancy") == 0  # everyone left the batch


def test_bad_requests_are_refused_while_good_ones_succeed(server: Server) -> None:
    url = server.url + "/v1/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    good = {"model": "tiny-llama", "prompt": PROMPTS[0], "max_tokens": 10, "temperature": 0}
    bad: list[tuple[object, int, str]] = [
        ({**good, "model": "gpt-9"}, 400, "not served here"),
        ({**good, "max_tokens": -1}, 422, "max_tokens"),
        ({**good, "max_tokens": 10**9}, 400, "context of 512"),
        ({**good, "prompt": "word " * 1200}, 400, "context of 512"),
        ({**good, "temperature": "hot"}, 422, "temperature"),
        ({**good, "n": 1000}, 422, "n"),
        ({**good, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
        ({**good, "prompt": [10**9]}, 400, "token ids"),
        ({**good, "presence_penalty": 1.0}, 400, "not supported"),
        ({"prompt": "x"}, 422, "model"),
        (b'{"model": "tiny-llama", "prompt": "\xff\xfe"}', 400, "not valid JSON"),
        (b"not json at all", 400, "not valid JSON"),
    ]

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        async with httpx.AsyncClient(timeout=60) as http:
            goods = [http.post(url, json=good, headers=auth) for _ in range(6)]
            bads = [
                http.post(url, content=body, headers={**auth, "Content-Type": "application/json"})
                if isinstance(body, bytes)
                else http.post(url, json=body, headers=auth)
                for body, _, _ in bad
            ]
            results = await asyncio.gather(*goods, *bads)
            return results[:6], results[6:]

    goods, bads = asyncio.run(run())
    texts = {r.json()["choices"][0]["text"] for r in goods}
    assert all(r.status_code == 200 for r in goods) and len(texts) == 1
    for (_, status, message), response in zip(bad, bads, strict=True):
        assert response.status_code == status, response.text
        assert message in response.json()["error"]["message"]
    chat = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "tiny-llama", "messages": [{"role": "wizard", "content": "x"}]},
        headers=auth,
    )
    assert chat.status_code == 422 and "role" in chat.json()["error"]["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_client_that_disconnects_stops_its_generation(server: Server) -> None:
    aborted = 'loom_finished_sequences_total{reason="abort"}'
    before, ended_before = server.metric(aborted), server.metric("loom_finished_sequences_total")
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        # 16 × 500 tokens take ≈ 1.6 s here: long enough that the server sees the client go
        # before they all end by themselves (one answer of 120 tokens took 0.18 s, and lost that
        # race once on a loaded CI machine).
        json={"model": "tiny-llama", "prompt": "a", "max_tokens": 500, "n": 16, "stream": True},
        headers={"Authorization": f"Bearer {KEY}"},
    ) as response:
        next(response.iter_lines())
    wait_until_ended(server, ended_before + 16)
    after_stream = server.metric(aborted)
    assert after_stream > before, "the abandoned stream's sequences were not aborted"
    # A plain (not streamed) request whose client gives up is stopped too.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/completions",
            json={"model": "tiny-llama", "prompt": "b", "max_tokens": 500, "n": 16},
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=0.1,  # the 16 answers take ≈ 1.6 s
        )
    wait_until_ended(server, ended_before + 32)
    assert server.metric(aborted) > after_stream, "the abandoned request was not aborted"


def wait_until_ended(server: Server, count: float) -> None:
    deadline = time.monotonic() + 60
    while server.metric("loom_finished_sequences_total") < count:
        assert time.monotonic() < deadline, "the abandoned sequences never ended"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def peft_adapter(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A PEFT LoRA adapter (random, non-zero) over the served model, and the model with it."""
    import peft

    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    torch.manual_seed(1)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    tuned = peft.get_peft_model(base, lora).eval()
    folder = tmp_path_factory.mktemp("adapter")
    tuned.save_pretrained(folder)
    return folder, tuned


@pytest.fixture(scope="module")
def limited(hf_dir: Path, peft_adapter: tuple) -> Iterator[Server]:
    """One sequence at a time, one waiting; the key from the environment; an adapter; no
    prefix cache; speculative decoding with a draft model."""
    srv = Server(
        hf_dir,
        "--max-batch",
        "1",
        "--max-queue",
        "1",
        "--adapter",
        f"tuned={peft_adapter[0]}",
        "--no-prefix-cache",
        "--speculate",
        str(hf_dir),  # the base as its own draft: the adapter's answers must stay its own
        env={"LOOM_API_KEY": "from-env"},
    )
    yield srv
    srv.stop()


@pytest.mark.slow
def test_full_queue_answers_429_and_the_key_comes_from_the_environment(limited: Server) -> None:
    with pytest.raises(openai.AuthenticationError):
        limited.client(key=KEY).models.list()

    async def flood() -> list[object]:
        client = openai.AsyncOpenAI(base_url=limited.url + "/v1", api_key="from-env", max_retries=0)
        return await asyncio.gather(
            *[
                # 400 tokens (≈ 0.6 s each): all 8 arrive while the first is still running
                client.completions.create(
                    model="tiny-llama", prompt="a", max_tokens=400, temperature=0
                )
                for _ in range(8)
            ],
            return_exceptions=True,
        )

    results = asyncio.run(flood())
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if isinstance(r, openai.types.Completion)]
    assert refused and served and len(refused) + len(served) == 8
    assert "queue is full" in str(refused[0])


def test_an_adapter_is_served_by_its_name(
    limited: Server, peft_adapter: tuple, reference: tuple
) -> None:
    client = limited.client(key="from-env")
    assert [m.id for m in client.models.list()] == ["tiny-llama", "tuned"]
    tok = reference[1]
    ids = tok.encode(PROMPTS[0], add_special_tokens=False)
    with torch.no_grad():
        out = peft_adapter[1].generate(
            input_ids=torch.tensor([ids]),
            max_new_tokens=10,
            do_sample=False,
            eos_token_id=tok.convert_tokens_to_ids(EOS),
            pad_token_id=0,
        )
    tuned = client.completions.create(
        model="tuned", prompt=PROMPTS[0], max_tokens=10, temperature=0
    )
    plain = client.completions.create(
        model="tiny-llama", prompt=PROMPTS[0], max_tokens=10, temperature=0
    )
    assert tuned.choices[0].text == tok.decode(out[0, len(ids) :].tolist())
    assert tuned.choices[0].text != plain.choices[0].text
    assert plain.choices[0].text == tok.decode(hf_greedy(reference, ids, 10))
    again = client.completions.create(
        model="tiny-llama", prompt=PROMPTS[0], max_tokens=10, temperature=0
    )
    assert again.choices[0].text == plain.choices[0].text
    assert limited.metric("loom_prefix_cache_hit_tokens_total", "from-env") == 0  # (it is off)
    assert limited.metric("loom_prefix_cache_query_tokens_total", "from-env") == 0
    # --speculate with the base as the draft: the base's requests accept every proposal, the
    # adapter's fewer, and the greedy answers above are unchanged
    proposed = limited.metric("loom_spec_proposed_tokens_total", "from-env")
    assert 0 < limited.metric("loom_spec_accepted_tokens_total", "from-env") < proposed


def assert_same_greedy_answers(a: Server, b: Server, prompts: list[str], max_tokens: int) -> None:
    """Both servers complete each prompt greedily with the same text and logprobs (1e-4)."""
    for prompt in prompts:
        kwargs = {"model": "tiny-llama", "prompt": prompt, "max_tokens": max_tokens}
        one = a.client().completions.create(**kwargs, temperature=0, logprobs=1)
        two = b.client().completions.create(**kwargs, temperature=0, logprobs=1)
        assert two.choices[0].text == one.choices[0].text
        assert two.choices[0].logprobs.token_logprobs == pytest.approx(
            one.choices[0].logprobs.token_logprobs, abs=1e-4
        )


@pytest.mark.slow
def test_two_tensor_parallel_workers_answer_like_one_process(server: Server, hf_dir: Path) -> None:
    srv = Server(hf_dir, "--tp", "2", "--api-key", KEY, "--step-tokens", "8")
    try:
        assert_same_greedy_answers(server, srv, PROMPTS, 16)
    finally:
        log = srv.stop()
    assert "2 tensor-parallel workers" in log


@pytest.mark.slow
def test_a_taken_port_is_a_clear_error(server: Server, hf_dir: Path) -> None:
    taken = subprocess.run(
        [sys.executable, "-m", "loom", "serve", str(hf_dir), "--port", str(server.port)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert taken.returncode != 0
    assert "could not listen on 127.0.0.1" in taken.stderr and "--port" in taken.stderr
    assert httpx.get(server.url + "/health").status_code == 200  # the first one is unharmed
