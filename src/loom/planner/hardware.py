"""Peak compute rates: a table of GPUs (dense, no sparsity) and a measured rate for CPUs.

GPU figures are the vendors' dense tensor-core peaks as collected in
shared/reference/published_runs.json. A CPU has no honest datasheet peak for PyTorch, so its
rate is measured once per machine (best of several large matmuls) and cached.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from loom.log import logger


@dataclass(frozen=True)
class GpuSpec:
    name: str
    pattern: str  # matched against torch.cuda.get_device_name()
    tflops: dict[str, float]  # per precision: bf16, fp8, tf32, fp32
    memory_gb: float


GPUS: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec(
            "H100-SXM",
            r"H100.*(SXM|HBM3)",
            {"bf16": 989.4, "fp8": 1978.9, "tf32": 494.7, "fp32": 66.9},
            80,
        ),
        GpuSpec(
            "H100-PCIe",
            r"H100.*PCIe",
            {"bf16": 756.0, "fp8": 1513.0, "tf32": 378.0, "fp32": 51.2},
            80,
        ),
        GpuSpec(
            "H100-NVL",
            r"H100.*NVL",
            {"bf16": 835.0, "fp8": 1670.0, "tf32": 417.5, "fp32": 60.0},
            94,
        ),
        GpuSpec("H200", r"H200", {"bf16": 989.0, "fp8": 1979.0, "tf32": 494.5, "fp32": 66.9}, 141),
        GpuSpec("A100", r"A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}, 80),
        GpuSpec(
            "B200", r"B200", {"bf16": 2250.0, "fp8": 4500.0, "tf32": 1100.0, "fp32": 80.0}, 180
        ),
        GpuSpec(
            "MI300X",
            r"MI30[05]X|MI325X",
            {"bf16": 1307.4, "fp8": 2614.9, "tf32": 653.7, "fp32": 163.4},
            192,
        ),
    )
}


def gpu_spec(device_name: str) -> GpuSpec | None:
    for spec in GPUS.values():
        if re.search(spec.pattern, device_name):
            return spec
    return None


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """Peak FLOP/s of one device at `precision` (fp32 or bf16), and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = gpu_spec(name)
        if spec is None:
            logger.warning("no peak figure for GPU %r; MFU will be reported as 0", name)
            return 0.0, f"unknown GPU {name}"
        key = "tf32" if precision == "fp32" and torch.backends.cuda.matmul.allow_tf32 else precision
        return spec.tflops[key] * 1e12, f"{spec.name} datasheet {key}"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return cpu_matmul_flops(
        dtype
    ), f"measured CPU {precision} matmul, {torch.get_num_threads()} threads"


def cache_dir() -> Path:
    return Path(os.environ.get("LOOM_CACHE_DIR", Path.home() / ".cache" / "loom"))


def cpu_matmul_flops(dtype: torch.dtype) -> float:
    """Best matmul rate of this CPU at the current thread count, measured once and cached."""
    key = f"{cpu_name()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{dtype}"
    path = cache_dir() / "cpu_peak.json"
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key in cached:
        return float(cached[key])
    rate = measure_matmul_flops(dtype)
    cached[key] = rate
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop training
        logger.warning("could not cache the CPU peak in %s: %s", path, e)
    return rate


def measure_matmul_flops(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)  # warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
