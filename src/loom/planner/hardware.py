"""Peak compute rates: a table of GPUs (dense, no sparsity) and a measured rate for CPUs.

GPU figures are the vendors' dense tensor-core peaks as collected in
shared/reference/published_runs.json. A CPU has no honest datasheet peak for PyTorch, so its
rate is measured once per machine, thread count and precision (the best sustained rate over
several shapes, the model's thin ones included) and cached; a training step faster than it
proves it wrong, and it is measured again (`peak_at_least`).
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

from loom.core.log import logger


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
    return cpu_matmul_flops(_dtype(precision)), (
        f"measured CPU {precision} matmul, {torch.get_num_threads()} threads"
    )


def peak_at_least(device: torch.device, precision: str, achieved: float, peak: float) -> float:
    """The peak to divide by once a step achieved `achieved` FLOP/s against `peak`.

    A peak is the best sustained rate of the device, so a training step faster than it proves
    the peak was mis-measured (a noisy moment on a shared CPU). On a CPU it is measured again
    (and the cache corrected); if the step is still faster, the step's own rate is the best
    rate seen and becomes the peak, with a warning. A GPU's datasheet peak is never raised.
    """
    if achieved <= peak or device.type != "cpu":
        return peak
    dtype = _dtype(precision)
    remeasured = cpu_matmul_flops(dtype, at_least=achieved)
    if remeasured < achieved:
        logger.warning(
            "a training step achieved %.3g FLOP/s, above the measured CPU %s matmul peak of "
            "%.3g FLOP/s even after measuring again; the step's rate is used as the peak",
            achieved,
            precision,
            remeasured,
        )
        _store(_cache_key(dtype), achieved)
        return achieved
    return remeasured


def cache_dir() -> Path:
    return Path(os.environ.get("LOOM_CACHE_DIR", Path.home() / ".cache" / "loom"))


# Square sizes bracketing what a CPU trains, and the thin shapes of a small model's
# projections (tokens × out × in); the peak is the best of them. Bump MEASUREMENT when the
# method changes, so that figures cached by an older, weaker method are measured again.
PEAK_SHAPES = [(1024, 1024, 1024), (2048, 2048, 2048), (2048, 768, 256), (2048, 256, 768)]
MEASUREMENT = "v2"


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision in ("bf16", "fp8") else torch.float32


def machine_key() -> str:
    """What a CPU measurement holds for: the CPU, the thread count, torch and the method."""
    threads = torch.get_num_threads()
    return f"{cpu_name()}|threads={threads}|torch={torch.__version__}|{MEASUREMENT}"


def _cache_key(dtype: torch.dtype) -> str:
    return f"{machine_key()}|{dtype}"


def _read_cache() -> dict[str, float]:
    try:
        cached = json.loads((cache_dir() / "cpu_peak.json").read_text())
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) else {}


def _store(key: str, rate: float) -> None:
    path = cache_dir() / "cpu_peak.json"
    cached = _read_cache()
    cached[key] = rate
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop training
        logger.warning("could not cache the CPU peak in %s: %s", path, e)


def cached_cpu_peak(dtype: torch.dtype) -> float:
    """The best matmul rate cached for this machine and `dtype` (0 if none), not measured."""
    return float(_read_cache().get(_cache_key(dtype), 0.0))


def cpu_matmul_flops(dtype: torch.dtype, at_least: float = 0.0) -> float:
    """Best sustained matmul rate of this CPU at the current thread count, measured once and
    cached (keyed by CPU, threads, torch version, dtype and method). A cached figure below
    `at_least` (a rate something has achieved) is measured again, keeping the better one."""
    key = _cache_key(dtype)
    cached = _read_cache().get(key)
    if cached is not None and cached >= at_least:
        return float(cached)
    rate = measure_matmul_flops(dtype)
    if cached is not None:
        rate = max(rate, float(cached))
    _store(key, rate)
    return rate


def measure_matmul_flops(
    dtype: torch.dtype,
    shapes: list[tuple[int, int, int]] | None = None,
    repeats: int = 5,
    min_seconds: float = 0.05,
) -> float:
    """The best sustained rate over `shapes` (m, n, k), each warmed up, then timed `repeats`
    times over enough back-to-back matmuls to last `min_seconds` (one short timing is all
    noise on a shared machine); the best timing of each shape counts."""
    best_rate = 0.0
    for m, n, k in shapes or PEAK_SHAPES:
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        out = torch.empty(m, n, dtype=dtype)
        start = time.perf_counter()
        torch.mm(a, b, out=out)  # warm up (and size the timing loop)
        torch.mm(a, b, out=out)
        once = max((time.perf_counter() - start) / 2, 1e-6)
        loops = max(1, int(min_seconds / once))
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(loops):
                torch.mm(a, b, out=out)
            seconds = (time.perf_counter() - start) / loops
            best_rate = max(best_rate, 2 * m * n * k / seconds)
    return best_rate


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
