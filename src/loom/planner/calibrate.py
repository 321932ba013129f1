"""`loom plan --calibrate`: measure this machine and save a hardware profile.

Measured: the best sustained matmul rate per precision (the peak: warmed up, best of several
timings of several shapes, the thin ones a small model uses included), the efficiency of each
shape against it (fitted as the planner's half-size constant), the attention kernel's rate,
memory bandwidth (a large elementwise add), and the bandwidth of an all-reduce between two
local processes (gloo). `--gpu this` in `loom plan` uses the saved profile; the prediction in
front of a CPU training run (`loom run`) uses it too, measuring it first (≈ 10 s, without the
all-reduce for one process) when there is none for this CPU, thread count and torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.loss import cross_entropy
from loom.models.llama import ModelConfig, build_model
from loom.parallel.recompute import apply_recompute
from loom.planner.hardware import (
    PEAK_SHAPES,
    cache_dir,
    cached_cpu_peak,
    cpu_name,
    machine_key,
    measure_matmul_flops,
)
from loom.planner.memory import GB
from loom.planner.spec import Hardware

SHAPES = [(256, 256, 256), (512, 512, 512), (1024, 256, 256)]  # besides PEAK_SHAPES
PROFILE = "hardware_profile.json"


def profile_path() -> Path:
    return cache_dir() / PROFILE


def significant(x: float) -> float:
    """A measured ratio kept to 3 significant digits: a slow kernel timed on a busy machine
    can be under 0.0005 of the peak, which 3 decimals would save as 0 (a zero rate)."""
    return float(f"{x:.3g}")


def _best_seconds(fn: Any, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


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


# (batch, heads, KV heads, sequence, head dim) of the attention timed when no model is given.
ATTENTION_SHAPE = (8, 8, 8, 256, 64)


def _attention_efficiency(
    dtype: torch.dtype, peak: float, shape: tuple[int, int, int, int, int] = ATTENTION_SHAPE
) -> float:
    """Causal attention forward + backward (what a block runs, GQA as Loom calls it) at
    `shape` as a fraction of `peak`. Small heads and short sequences run far below the rate of
    large ones on a CPU, so a prediction for a model measures the model's own shape."""
    b, heads, kv_heads, seq, d = shape
    q = torch.randn(b, heads, seq, d, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(b, kv_heads, seq, d, dtype=dtype, requires_grad=True) for _ in range(2))

    def run() -> None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        out.sum().backward()

    flops = 3 * 4 * b * heads * seq * seq * d / 2  # QKᵀ and AV, lower triangle, fwd + 2× bwd
    return flops / _best_seconds(run, repeats=5) / peak


def best_peaks(profile_tflops: dict[str, float]) -> dict[str, float]:
    """The profile's peaks, raised to the best rate this machine has shown since (the cached
    matmul peak, which a training step faster than it raises): a profile calibrated while the
    machine was busy must not make every later prediction slow."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    cached = {k: cached_cpu_peak(dtypes[k]) / 1e12 for k in profile_tflops if k in dtypes}
    return {k: max(v, cached.get(k, 0.0)) for k, v in profile_tflops.items()}


def attention_at(
    shape: tuple[int, int, int, int, int], peak_tflops: dict[str, float]
) -> dict[str, float]:
    """Measured attention efficiency per precision at a model's own `shape`, cached in the
    saved profile next to the default shape's."""
    path = profile_path()
    profile = json.loads(path.read_text())
    key = "x".join(map(str, shape))
    cached = profile.setdefault("attention_at", {})
    if key not in cached:
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        cached[key] = {
            name: significant(_attention_efficiency(dtypes[name], peak * 1e12, shape))
            for name, peak in peak_tflops.items()
            if name in dtypes
        }
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(profile, indent=2))
        os.replace(tmp, path)
    return dict(cached[key])


def calibrate(collective: bool = True) -> dict[str, Any]:
    """Measure this machine and save the profile; `collective=False` skips the all-reduce
    (a single process never runs one)."""
    threads = torch.get_num_threads()
    logger.info("calibrating %s with %d threads (10 s to a minute)", cpu_name(), threads)
    peaks, half_sizes, attention = {}, {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates = {shape: measure_matmul_flops(dtype, [shape]) for shape in PEAK_SHAPES + SHAPES}
        # The peak is the best sustained rate at any shape; shape efficiencies are relative to it.
        peaks[name] = max(rates.values())
        points = [(shape, rate / peaks[name]) for shape, rate in rates.items()]
        half_sizes[name] = _fit_half_size(points, 1.0)
        attention[name] = _attention_efficiency(dtype, peaks[name])
    profile = {
        "name": f"this ({cpu_name()}, {threads} threads)",
        "key": machine_key(),
        "peak_tflops": {k: v / 1e12 for k, v in peaks.items()},
        "matmul_half_size": half_sizes["fp32"],
        "attention_efficiency": {k: significant(v) for k, v in attention.items()},
        "memory_gbps": _memory_bandwidth(),
        "collective_gbps": _collective_bandwidth() if collective else None,
        "memory_gb": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB,
        "runtime_gb": runtime_gb(),
        "threads": threads,
    }
    path = profile_path()
    previous = json.loads(path.read_text()) if path.is_file() else None
    if previous is not None and previous.get("key") == profile["key"]:
        profile = best_of(previous, profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2))
    logger.info("saved %s: %s", path, json.dumps(profile))
    return profile


def runtime_gb() -> float:
    """Resident memory of a fresh Python process with torch and Loom's trainer loaded: what a
    `loom train` process holds before its first tensor."""
    code = (
        "import loom.train.trainer; from loom.core.device import process_memory_bytes as m; "
        "print(m(peak=False))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        raise LoomError(f"measuring a Loom process's memory failed: {done.stderr[-500:]}")
    return int(done.stdout) / GB


def best_of(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Two calibrations of the same machine, merged rate by rate into the best of each: a
    calibration on a busy machine measures every rate too low, and a rate something has
    reached once is one the machine can sustain. Attention efficiencies are compared as
    rates (efficiency × peak), then expressed against the merged peak."""
    peaks = {k: max(v, old["peak_tflops"].get(k, 0.0)) for k, v in new["peak_tflops"].items()}

    def attention(profile: dict[str, Any], name: str) -> float:
        return profile["attention_efficiency"].get(name, 0.0) * profile["peak_tflops"][name]

    def best(key: str) -> float | None:
        rates = [p[key] for p in (old, new) if p.get(key) is not None]
        return max(rates) if rates else None

    return {
        **new,
        "peak_tflops": peaks,
        "matmul_half_size": min(old["matmul_half_size"], new["matmul_half_size"]),
        "attention_efficiency": {
            k: significant(max(attention(old, k), attention(new, k)) / peaks[k])
            for k in new["attention_efficiency"]
        },
        "memory_gbps": best("memory_gbps"),
        "collective_gbps": best("collective_gbps"),
    }


def this_machine(
    devices: int,
    measure: bool = False,
    attention_shape: tuple[int, int, int, int, int] | None = None,
) -> Hardware:
    """The calibrated profile as planner hardware: one node of `devices` processes sharing its
    cores and memory, so each gets 1/devices of the measured rates. `measure`: calibrate first
    when the saved profile is missing or was measured for another CPU, thread count or torch;
    `attention_shape` (batch, heads, KV heads, seq, head dim): the model's attention, measured."""
    path = profile_path()
    p = json.loads(path.read_text()) if path.is_file() else None
    stale = p is None or p.get("key") != machine_key()
    if stale and measure:
        p = calibrate(collective=devices > 1)
    elif p is None:
        raise LoomError("--gpu this needs a profile of this machine; run `loom plan --calibrate`")
    elif stale:
        logger.warning(
            "the profile in %s was measured for %s, not %s; run `loom plan --calibrate` again",
            path,
            p.get("key", "an older Loom"),
            machine_key(),
        )
    assert p is not None
    if devices > 1 and p["collective_gbps"] is None:
        p = calibrate(collective=True)
    if p.get("runtime_gb") is None:  # a profile from before it: measured once, kept
        p = {**p, "runtime_gb": runtime_gb()}
        path.write_text(json.dumps(p, indent=2))
    attention = p["attention_efficiency"]
    if attention_shape is not None:
        attention = attention_at(attention_shape, p["peak_tflops"])
    peaks = best_peaks(p["peak_tflops"])
    # attention efficiencies were measured against the profile's peaks: keep their rates
    attention = {k: v * p["peak_tflops"][k] / peaks[k] for k, v in attention.items()}
    share = 1 / devices
    return Hardware(
        name=p["name"],
        peak_tflops={k: v * share for k, v in peaks.items()},
        memory_gb=p["memory_gb"] / devices,
        devices=devices,
        devices_per_node=devices,
        intra_node_gbps=p["collective_gbps"] or 1.0,  # unused by one process
        inter_node_gbps=p["collective_gbps"] or 1.0,
        hbm_gbps=p["memory_gbps"] * share,
        host_memory_gb=p["memory_gb"],
        host_link_gbps=p["memory_gbps"] * share,
        matmul_efficiency=1.0,
        matmul_half_size=p["matmul_half_size"],
        attention_efficiency=attention,
        runtime_gb=p["runtime_gb"],
        host_device=True,
    )


def measure_activations(
    cfg: ModelConfig, batch: int, seq: int, recompute: str, precision: str
) -> float:
    """Bytes of activations held after a forward pass and the loss (what backward will use),
    measured with torch's memory tracker on a Loom model with `recompute` applied."""
    from torch.distributed._tools.mem_tracker import MemTracker

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
