"""On a CUDA device: training MFU, peak memory against the planner, a float8 step and `loom serve`
through the real command lines. Without CUDA the `gpu` tests are skipped and named in the
summary (tests/conftest.py); the check script's no-GPU path is tested everywhere."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_MODEL, free_port

ROOT = Path(__file__).resolve().parents[1]
LOOM = [sys.executable, "-m", "loom"]


def loom_train(data_dir: Path, run_dir: Path, *overrides: str) -> list[dict]:
    """`loom train configs/tiny.toml` on CUDA in bf16 with `overrides`; the metrics records."""
    cmd = [
        *LOOM,
        "train",
        str(ROOT / "configs/tiny.toml"),
        *TINY_MODEL,
        f"--data.path={data_dir}",
        f"--run_dir={run_dir}",
        "--train.device=cuda",
        "--train.precision=bf16",
        "--train.micro_batch_size=0",
        "--train.eval_interval=0",
        "--train.eval_batches=1",
        "--metrics.log_interval=1",
        "--metrics.progress=plain",
        *overrides,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.gpu
def test_bf16_training_reports_a_real_mfu(data_dir: Path, tmp_path: Path) -> None:
    records = loom_train(data_dir, tmp_path / "run", "--train.steps=6", "--train.batch_size=8")
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(math.isfinite(r["loss"]) for r in records)
    # After the first step (allocator and kernel warm-up) the MFU is a fraction of the peak.
    assert all(0 < r["mfu"] <= 1 for r in records[1:]), [r["mfu"] for r in records]
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.gpu
def test_peak_memory_is_near_the_planners_prediction(data_dir: Path, tmp_path: Path) -> None:
    """A model big enough that states and activations, not the allocator's slack, dominate
    (dim 1024, 4 layers, 8 × 512 tokens: about 1 GiB): `max_memory_allocated` of the run
    (metrics' peak_mem_gib) against the planner's tensors for the same config. Within 1.5× either
    way: `loom train` refuses or starts a run on this number, and a larger miss would refuse
    runs that fit or start runs that run out of memory."""
    import torch

    from loom.core.config import load_config
    from loom.parallel.dims import resolve
    from loom.planner.memory import CONTEXT_BYTES, FRAGMENTATION
    from loom.planner.training import local_hardware, predicted_memory

    shape = ["--model.dim=1024", "--model.n_layers=4", "--model.n_heads=16"]
    shape += ["--model.n_kv_heads=4", "--model.ffn_hidden=4096", "--model.max_seq_len=512"]
    train = ["--train.steps=3", "--train.batch_size=8", "--train.seq_len=512"]
    records = loom_train(data_dir, tmp_path / "run", *shape, *train)
    measured = max(r["peak_mem_gib"] for r in records) * 2**30

    cfg = load_config(
        ROOT / "configs/tiny.toml",
        [*TINY_MODEL, *shape, *train, "--train.precision=bf16", "--train.micro_batch_size=0"],
    )
    memory = predicted_memory(cfg, resolve(cfg, 1), local_hardware(torch.device("cuda"), 1))
    states = memory.params + memory.grads + memory.optimizer + memory.activations
    tensors = states + memory.other - CONTEXT_BYTES - FRAGMENTATION * states
    assert tensors / 1.5 <= measured <= tensors * 1.5, (measured / 2**30, memory.gib())


@pytest.mark.gpu
def test_a_float8_step_trains_on_an_h100(data_dir: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"float8 matmuls need compute capability 8.9+ ({torch.cuda.get_device_name()})")
    records = loom_train(
        data_dir, tmp_path / "run", "--train.float8=true", "--train.steps=4", "--train.batch_size=8"
    )
    assert len(records) == 4
    assert all(math.isfinite(r["loss"]) and 0 < r["mfu"] <= 1 for r in records[1:])


@pytest.mark.gpu
def test_serve_answers_on_cuda(data_dir: Path, tmp_path: Path) -> None:
    import httpx
    import openai

    run = tmp_path / "run"
    loom_train(data_dir, run, "--train.steps=2", "--train.batch_size=4")
    port = free_port()
    server = subprocess.Popen(
        [*LOOM, "serve", str(run), "--port", str(port), "--dtype", "bf16"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            assert server.poll() is None, server.stdout.read() if server.stdout else ""
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        answer = client.completions.create(model=model, prompt="def f(x):", max_tokens=8)
        assert 0 < answer.usage.completion_tokens <= 8
        assert answer.choices[0].finish_reason in {"length", "stop"}
    finally:
        server.terminate()
        server.wait(30)


def test_gpu_check_without_cuda_says_so_and_writes_nothing() -> None:
    """CUDA hidden, so this holds on a GPU machine too (the real check takes minutes)."""
    benchmarks = ROOT / "BENCHMARKS.md"
    before = benchmarks.read_bytes()
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "gpu_check: no CUDA device; nothing run, BENCHMARKS.md unchanged"
    ]
    assert benchmarks.read_bytes() == before
