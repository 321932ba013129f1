"""`loom plan --calibrate`: measure this machine and save a hardware profile.

Measured: the best matmul rate per precision (the peak), the efficiency of matmuls of the
shapes a small model uses (fitted as the planner's ceiling and half-size constants), memory
bandwidth (a large elementwise add), and the bandwidth of an all-reduce between two local
processes on the backend training would use (gloo on CPU, NCCL on GPUs). `--gpu this` in
`loom plan`, and the planner in front of `loom train`, use the saved profile.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loom.errors import LoomError
from loom.log import logger
from loom.models.llama import ModelConfig
from loom.planner.hardware import cache_dir, cpu_name, measure_matmul_flops
from loom.planner.memory import GB
from loom.planner.spec import Hardware

SHAPES = [(256, 256, 256), (512, 512, 512), (2048, 256, 768), (2048, 768, 256), (1024, 1024, 1024)]
PROFILE = "hardware_profile.json"


def profile_path() -> Path:
    return cache_dir() / PROFILE


def _best_seconds(fn: Any, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _shape_efficiency(dtype: torch.dtype, peak: float) -> list[tuple[tuple[int, int, int], float]]:
    out = []
    for m, n, k in SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        seconds = _best_seconds(lambda a=a, b=b: torch.mm(a, b))
        out.append(((m, n, k), 2 * m * n * k / seconds / peak))
    return out


def _fit_half_size(points: list[tuple[tuple[int, int, int], float]], ceiling: float) -> float:
    """The half-size x0 that best explains efficiency = ceiling · Π d / (d + x0)."""

    def error(x0: float) -> float:
        total = 0.0
        for dims, measured in points:
            model = ceiling
            for d in dims:
                model *= d / (d + x0)
            total += (model - measured) ** 2
        return total

    return min((error(x0), x0) for x0 in [2.0**e for e in range(0, 11)])[1]


def _memory_bandwidth() -> float:
    x = torch.randn(1 << 24)
    y = torch.randn(1 << 24)
    seconds = _best_seconds(lambda: torch.add(x, y))
    return 3 * x.numel() * 4 / seconds / 1e9


def _all_reduce_worker(rank: int, store: str, result: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    tensor = torch.ones(1 << 24)  # 64 MiB
    dist.all_reduce(tensor)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(3):
        dist.all_reduce(tensor)
    seconds = (time.perf_counter() - start) / 3
    if rank == 0:
        # Bus bandwidth of a ring all-reduce: 2 (n − 1)/n · bytes / time.
        Path(result).write_text(str(tensor.numel() * 4 / seconds / 1e9))
    dist.barrier()
    dist.destroy_process_group()


def _collective_bandwidth() -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store, result = os.path.join(tmp, "store"), os.path.join(tmp, "result")
        mp.spawn(_all_reduce_worker, args=(store, result), nprocs=2, join=True)
        return float(Path(result).read_text())


def _attention_efficiency(dtype: torch.dtype, peak: float) -> float:
    """Causal attention forward + backward (what a block runs) as a fraction of `peak`."""
    b, heads, seq, d = 8, 8, 256, 64
    q, k, v = (torch.randn(b, heads, seq, d, dtype=dtype, requires_grad=True) for _ in range(3))

    def run() -> None:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()

    flops = 3 * 4 * b * heads * seq * seq * d / 2  # QKᵀ and AV, lower triangle, fwd + 2× bwd
    return flops / _best_seconds(run, repeats=3) / peak


def calibrate() -> dict[str, Any]:
    threads = torch.get_num_threads()
    logger.info("calibrating %s with %d threads (about a minute)", cpu_name(), threads)
    peaks, ceilings, half_sizes, attention = {}, {}, {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        big = measure_matmul_flops(dtype, repeats=10)
        points = _shape_efficiency(dtype, big)
        # The peak is the best rate seen at any shape (one 2048³ timing on a shared machine
        # can come out low); shape efficiencies are relative to it.
        best = max([1.0, *(e for _, e in points)])
        peaks[name] = big * best
        points = [(d, e / best) for d, e in points]
        ceilings[name] = max(e for _, e in points)
        half_sizes[name] = _fit_half_size(points, ceilings[name])
        attention[name] = _attention_efficiency(dtype, peaks[name])
    profile = {
        "name": f"this ({cpu_name()}, {threads} threads)",
        # Per-precision matmul ceilings are folded into the peaks the planner uses.
        "peak_tflops": {k: v * ceilings[k] / 1e12 for k, v in peaks.items()},
        "matmul_half_size": half_sizes["fp32"],
        "attention_efficiency": {k: round(v / ceilings[k], 3) for k, v in attention.items()},
        "memory_gbps": _memory_bandwidth(),
        "collective_gbps": _collective_bandwidth(),
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB,
        "threads": threads,
    }
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2))
    logger.info("saved %s: %s", path, json.dumps(profile))
    return profile


def this_machine(devices: int) -> Hardware:
    """The calibrated profile as planner hardware (one node of `devices` processes)."""
    path = profile_path()
    if not path.is_file():
        raise LoomError("--gpu this needs a profile of this machine; run `loom plan --calibrate`")
    p = json.loads(path.read_text())
    return Hardware(
        name=p["name"],
        peak_tflops=p["peak_tflops"],
        memory_gb=p["memory_gb"] / devices,
        devices=devices,
        devices_per_node=devices,
        intra_node_gbps=p["collective_gbps"],
        inter_node_gbps=p["collective_gbps"],
        hbm_gbps=p["memory_gbps"],
        host_memory_gb=p["memory_gb"],
        host_link_gbps=p["memory_gbps"],
        matmul_efficiency=1.0,
        matmul_half_size=p["matmul_half_size"],
        attention_efficiency=p["attention_efficiency"],
    )


def measure_activations(
    cfg: ModelConfig, batch: int, seq: int, recompute: str, precision: str
) -> float:
    """Bytes of activations held after a forward pass and the loss (what backward will use),
    measured with torch's memory tracker on a Loom model with `recompute` applied."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from loom.models.llama import build_model
    from loom.parallel.recompute import apply_recompute
    from loom.train.trainer import cross_entropy

    model = build_model(cfg, "cpu")
    model.init_weights()
    apply_recompute(model, recompute)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        # After autocast exits, as in training: its cache of bf16 weight copies is gone, and
        # only the copies autograd saved remain.
        snapshot = tracker.get_tracker_snapshot("current")
    del loss
    (per_device,) = snapshot.values()
    return float(sum(v for k, v in per_device.items() if str(k).endswith("ACT")))
