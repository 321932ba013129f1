"""The one-GPU check: training MFU (bf16, float8), peak memory against the planner and
`--simulate`, offload, and `loom serve` throughput; writes the "gpu_check" section.

Every measurement goes through the real command line (`loom train`, `loom serve`) in a
subprocess with its own timeout, so one failure is reported as a line and the rest still runs:
the first run on a GPU is the one that counts. `--cpu` runs the same steps on tiny models for
two or three steps on the CPU (to catch a wrong flag before a GPU is spent) and writes nothing
to BENCHMARKS.md. Run it through `benchmarks/gpu_check.sh`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, write_section

from loom.core.config import load_config
from loom.parallel.dims import resolve
from loom.planner.training import local_hardware, predicted_memory

GIB = 2**30
LOOM = [sys.executable, "-m", "loom"]


@dataclass
class Run:
    """One `loom train` run: a name, the model section, and train/memory overrides."""

    name: str
    model: dict[str, Any]
    train: dict[str, Any]
    memory: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What to run: GPU sizes, or the same steps on tiny CPU models (`--cpu`)."""

    cpu: bool
    runs: list[Run]
    offload: list[Run]
    warmup: int  # logged steps left out of the means (compilation, allocator warm-up)
    train_timeout: float
    serve_clients: tuple[int, ...] = (1, 16, 64)
    serve_max_tokens: int = 64


def make_plan(cpu: bool) -> Plan:
    if cpu:
        tiny = {"preset": "tiny", "vocab_size": 512}
        base = {"steps": 3, "batch_size": 4, "seq_len": 64, "precision": "fp32", "device": "cpu"}
        runs = [
            Run("1B bf16", tiny, {**base}),
            Run("1B fp8", tiny, {**base, "float8": True}),
            Run("8B-shaped bf16", {**tiny, "n_layers": 2}, {**base}),
            Run("8B-shaped fp8", {**tiny, "n_layers": 2}, {**base, "float8": True}),
        ]
        offload = [Run("offload none", tiny, {**base}, {"offload": "none"})]
        return Plan(True, runs, offload, warmup=1, train_timeout=240, serve_max_tokens=8)
    # llama3.2-1b as published (1.24B); llama3.1-8b's layer shape with 4 of its 32 layers
    # (1.9B parameters: a 4096-wide residual, 14336 FFN, GQA 32/8, its 128k vocabulary).
    one_b = {"preset": "llama3.2-1b"}
    eight_b = {"preset": "llama3.1-8b", "n_layers": 4}
    base = {"steps": 12, "seq_len": 2048, "precision": "bf16", "compile": True, "device": "cuda"}
    runs = [
        Run("llama3.2-1b bf16", one_b, {**base, "batch_size": 8}),
        Run("llama3.2-1b fp8", one_b, {**base, "batch_size": 8, "float8": True}),
        Run("llama3.1-8b shape, 4 layers, bf16", eight_b, {**base, "batch_size": 4}),
        Run("llama3.1-8b shape, 4 layers, fp8", eight_b, {**base, "batch_size": 4, "float8": True}),
    ]
    eager = {**base, "steps": 6, "batch_size": 4, "compile": False}
    offload = [
        Run("offload none", one_b, eager, {"offload": "none"}),
        Run("offload params", one_b, eager, {"offload": "params"}),
    ]
    return Plan(False, runs, offload, warmup=3, train_timeout=150)


class Budget:
    """The wall-clock budget: a step gets what is left, and is skipped when too little is."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_cmd(cmd: list[str], timeout: float, log: Path) -> tuple[int | None, str]:
    """Run `cmd` (stdout+stderr to `log`); (exit code or None on timeout, its stdout)."""
    with log.open("w") as f:
        try:
            done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, ""
    return done.returncode, done.stdout


def tail(log: Path, lines: int = 3) -> str:
    text = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return " / ".join(line.strip() for line in text[-lines:])[:300]


def prepare_data(work: Path, budget: Budget) -> Path:
    """Token shards of 60 standard-library modules with a 512-token BPE (no download)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = work / "corpus"
    corpus.mkdir()
    for path in sorted(stdlib.glob("*.py"))[:60]:
        shutil.copy(path, corpus / path.name)
    for cmd in (
        [
            *LOOM,
            "tokenizer",
            "train",
            "--input",
            f"{corpus}/*.py",
            "--vocab-size",
            "512",
            "--out",
            str(work / "tok"),
        ],
        [
            *LOOM,
            "data",
            "tokenize",
            "--input",
            f"{corpus}/*.py",
            "--tokenizer",
            str(work / "tok"),
            "--out",
            str(work / "shards"),
            "--val-fraction",
            "0.05",
        ],
    ):
        code, _ = run_cmd(cmd, min(120, budget.left()), work / "data.log")
        if code != 0:
            raise SystemExit(f"gpu_check: preparing data failed: {tail(work / 'data.log')}")
    return work / "shards"


def slug(name: str) -> str:
    """A run's file and folder name."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def write_config(run: Run, work: Path, data: Path, name: str) -> Path:
    raw = {
        "run_dir": str(work / name),
        "model": run.model,
        "data": {"path": str(data)},
        "train": {"eval_interval": 0, "eval_batches": 1, **run.train},
        "optimizer": {"warmup_steps": 2},
        "checkpoint": {"interval": 1000, "keep": 1},
        "metrics": {"log_interval": 1, "tensorboard": False, "progress": "plain"},
        "memory": run.memory,
    }
    path = work / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def planner_gib(config: Path) -> tuple[float, float]:
    """The planner's predicted peak for this exact config on this device, the number `loom
    train` logs before it starts: (total, tensors only, i.e. without the CUDA-context allowance
    and fragmentation, which `max_memory_allocated` does not see)."""
    from loom.planner.memory import CONTEXT_BYTES, FRAGMENTATION

    cfg = load_config(config)
    dims = resolve(cfg, 1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    memory = predicted_memory(cfg, dims, local_hardware(device, 1))
    states = memory.params + memory.grads + memory.optimizer + memory.activations
    tensors = states + memory.other - CONTEXT_BYTES - FRAGMENTATION * states
    return memory.total / GIB, tensors / GIB


def simulate_gib(config: Path, work: Path, budget: Budget) -> str:
    log = work / (config.stem + "-simulate.log")
    cmd = [*LOOM, "train", str(config), "--simulate", "1", "--json"]
    code, out = run_cmd(cmd, min(180, budget.left()), log)
    if code != 0:
        return f"not available ({'timed out' if code is None else tail(log, 1)})"
    return f"{json.loads(out)['memory_gib']['total']:.2f}"


@dataclass
class TrainResult:
    tokens_per_s: float
    mfu: float
    peak_gib: float
    steps: int


def train(run: Run, work: Path, data: Path, plan: Plan, budget: Budget) -> TrainResult | str:
    """`loom train` of `run`; the mean of the logged steps after the warm-up, or why not."""
    config = write_config(run, work, data, slug(run.name))
    if budget.left() < 30:
        return "not run: out of time"
    log = work / f"{slug(run.name)}.log"
    code, _ = run_cmd([*LOOM, "train", str(config)], min(plan.train_timeout, budget.left()), log)
    metrics_path = work / slug(run.name) / "metrics.jsonl"
    records = (
        [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if metrics_path.exists()
        else []
    )
    shutil.rmtree(work / slug(run.name), ignore_errors=True)  # checkpoints of a 1B model are ~15 GB
    if code != 0:
        return f"failed ({'timed out' if code is None else f'exit {code}'}): {tail(log)}"
    timed = [r for r in records if r["step"] > plan.warmup] or records
    return TrainResult(
        tokens_per_s=sum(r["tokens_per_s"] for r in timed) / len(timed),
        mfu=sum(r["mfu"] for r in timed) / len(timed),
        peak_gib=max(r["peak_mem_gib"] for r in records),
        steps=len(timed),
    )


def serve_throughput(run_dir: Path, plan: Plan, work: Path, budget: Budget) -> list[str]:
    """`loom serve RUN_DIR` on this device; closed-loop clients, each sending two completions
    back to back (at least 8 requests per N); output tokens per second of wall time."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    dtype = ["--dtype", "fp32" if plan.cpu else "bf16"]
    log = work / "serve.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            [*LOOM, "serve", str(run_dir), "--port", str(port), "--max-batch", "64", *dtype],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    rows = []
    try:
        start = time.monotonic()
        while True:
            if proc.poll() is not None or time.monotonic() - start > min(120, budget.left()):
                return [f"| serve | not available: {tail(log)} | | |"]
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
            model = json.load(r)["data"][0]["id"]
        for clients in plan.serve_clients:
            if budget.left() < 20:
                rows.append(f"| {clients} | not run: out of time | | |")
                continue
            rows.append(load(url, model, clients, plan.serve_max_tokens))
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def load(url: str, model: str, clients: int, max_tokens: int) -> str:
    requests = max(2 * clients, 8)
    tokens: list[int] = []
    latencies: list[float] = []
    errors: list[str] = []

    def client(k: int) -> None:
        for i in range(k, requests, clients):
            body = {
                "model": model,
                "prompt": f"def function_{i}(x):\n    return",
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            req = urllib.request.Request(
                url + "/v1/completions",
                json.dumps(body).encode(),
                {"Content-Type": "application/json"},
            )
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    tokens.append(json.load(r)["usage"]["completion_tokens"])
                latencies.append(time.perf_counter() - t0)
            except OSError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    p50 = f"{lat[len(lat) // 2]:.2f}" if lat else "-"
    failed = f" ({len(errors)} failed: {errors[0][:80]})" if errors else ""
    return f"| {clients} | {sum(tokens) / wall:,.0f}{failed} | {len(tokens)} | {p50} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="dry run on tiny CPU models")
    parser.add_argument("--budget-s", type=float, default=500, help="stop starting steps after")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing run, BENCHMARKS.md unchanged")
        return
    plan = make_plan(args.cpu)
    budget = Budget(args.budget_s)
    work = Path(args.work or tempfile.mkdtemp(prefix="loom-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(work, budget)

    lines = ["| run | tokens/s | MFU | peak GiB (measured) | planner GiB (total / tensors) |"]
    lines.append("|---|---:|---:|---:|---:|")
    for run in plan.runs:
        result = train(run, work, data, plan, budget)
        total, tensors = planner_gib(work / f"{slug(run.name)}.toml")
        if isinstance(result, str):
            lines.append(f"| {run.name} | {result} | | | {total:.2f} / {tensors:.2f} |")
        else:
            lines.append(
                f"| {run.name} | {result.tokens_per_s:,.0f} | {result.mfu:.1%} | "
                f"{result.peak_gib:.2f} | {total:.2f} / {tensors:.2f} |"
            )
        print(lines[-1], flush=True)
    first = work / f"{slug(plan.runs[0].name)}.toml"
    lines.append(f"\n`loom train {first.name} --simulate 1 --json` (first row's layout), peak GiB:")
    lines.append(simulate_gib(first, work, budget))

    lines += ["", "| offload | tokens/s | peak GiB | planner GiB |", "|---|---:|---:|---:|"]
    for run in plan.offload:
        result = train(run, work, data, plan, budget)
        total, _ = planner_gib(work / f"{slug(run.name)}.toml")
        if isinstance(result, str):
            lines.append(f"| {run.memory['offload']} | {result} | | {total:.2f} |")
        else:
            lines.append(
                f"| {run.memory['offload']} | {result.tokens_per_s:,.0f} | "
                f"{result.peak_gib:.2f} | {total:.2f} |"
            )
        print(lines[-1], flush=True)

    # Serving: a short run of the first model kept (checkpoint and all), served from its folder.
    serve_run = Run("serve model", plan.runs[0].model, {**plan.runs[0].train, "steps": 1})
    serve_run.train.update(float8=False, compile=False)
    config = write_config(serve_run, work, data, "serve-model")
    lines += ["", "| clients | output tokens/s | requests | p50 latency s |"]
    lines.append("|---:|---:|---:|---:|")
    code, _ = run_cmd([*LOOM, "train", str(config)], min(240, budget.left()), work / "sm.log")
    if code != 0:
        lines.append(f"| - | not available: training it failed: {tail(work / 'sm.log')} | | |")
    else:
        lines += serve_throughput(work / "serve-model", plan, work, budget)
    print("\n".join(lines[-5:]), flush=True)
    shutil.rmtree(work / "serve-model", ignore_errors=True)

    if plan.cpu:
        print("gpu_check --cpu: dry run done; BENCHMARKS.md not written")
        return
    write_section("gpu_check", f"{machine()}\n\n" + "\n".join(lines))
    print("gpu_check: wrote the gpu_check section of BENCHMARKS.md")


if __name__ == "__main__":
    main()
