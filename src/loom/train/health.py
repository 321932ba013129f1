"""Pre-flight hardware health: a few cheap checks on every rank before the first step.

Why: a device that computes wrong results (silent data corruption), a GPU that is overheating,
throttled or has uncorrectable memory errors, or a broken link between ranks ruins a long run
quietly or stalls it late; at start-up, well under a second of checks finds most of them and
names the device, before any step is spent.

Each rank runs, each check ending "ok", "warn", "failed" or "not checked" (with the reason):

    matmul_<dtype>  a fixed-seed 256 x 256 product on the device (fp32 and the training dtype)
                    against a float64 CPU reference, within a rounding bound (see
                    `matmul_check`); on a CPU this still catches a broken BLAS / vector path
    nvml            CUDA only, through pynvml when installed: uncorrectable ECC errors and
                    failed row remapping, temperature against the slowdown threshold, and
                    hardware slowdown / thermal / power-brake throttling
    memory          free device memory (host RAM on a CPU, shared by the host's ranks) against
                    the planner's predicted peak: a warning, the prediction being an estimate
    disk            free space of the run folder against the checkpoints the run keeps: a
                    warning
    all_reduce      with more than one rank: one all-reduce of a known integer pattern must
                    come out exact on every rank (a broken link or NIC does not); its bus
                    bandwidth is recorded, not asserted

Every rank's report is gathered; rank 0 writes them all to `<run_dir>/health.json` (failures
included), and a failure anywhere stops every rank with one LoomError naming the ranks, hosts,
devices and the fix.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from loom.core import distributed
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.run_files import RunFiles, write_atomic

OK, WARN, FAILED, NOT_CHECKED = "ok", "warn", "failed", "not checked"
MATMUL_SIZE = 256
ALL_REDUCE_BYTES = 16 * 2**20  # ≈ 25 ms on gloo between two CPU processes, far less on NCCL
_SEED = 24  # issue 24: any fixed seed, so every rank and run checks the same product
_PATTERN = 251  # all-reduce values cycle 1..251, so a misplaced chunk shows too
# Clock-event (throttle) reasons that mean the hardware is slowing itself down (nvml.h).
_HW_SLOWDOWN = {
    0x08: "hardware slowdown",
    0x20: "software thermal slowdown",
    0x40: "hardware thermal slowdown",
    0x80: "hardware power brake",
}
_FLOAT_BITS = {  # dtype -> (integer view, bit position of the lowest exponent bit)
    torch.float32: (torch.int32, 23),
    torch.bfloat16: (torch.int16, 7),
    torch.float16: (torch.int16, 10),
}


@dataclass(frozen=True)
class Needs:
    """What the run will need of this host, known at start-up."""

    memory_bytes: float | None  # the planner's predicted peak per device; None = unknown
    checkpoint_bytes: float  # one checkpoint of the run
    checkpoints: int  # checkpoints on disk at once (kept ones plus the one being written)


def checkpoint_bytes(n_params: int) -> float:
    """An upper estimate of one checkpoint: fp32 weights and two fp32 Adam moments per
    parameter (a LoRA run saves less)."""
    return 12.0 * n_params


def preflight(
    device: torch.device, dtype: torch.dtype, run_dir: Path, needs: Needs, corrupt: bool = False
) -> dict[str, Any]:
    """Run the checks on this rank, gather every rank's, write health.json (rank 0) and log;
    raise a LoomError naming every failed rank. `corrupt` flips one bit of the matmul results
    (the `sdc` fault of LOOM_FAULTS), standing in for a bad device."""
    start = time.perf_counter()
    checks = device_checks(device, dtype, corrupt)
    checks["memory"] = memory_check(device, needs.memory_bytes)
    checks["disk"] = disk_check(run_dir, needs.checkpoint_bytes * needs.checkpoints)
    if distributed.world_size() > 1:
        checks["all_reduce"] = all_reduce_check(device)
    ranks = _gather(device, checks, start)
    failed = _failed(ranks)
    report = {"ok": not failed, "world_size": len(ranks), "ranks": ranks}
    if distributed.rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(RunFiles(run_dir).health, json.dumps(report, indent=1) + "\n")
        _log(ranks)
    if failed:
        raise LoomError(
            f"pre-flight health check failed on {refusal(failed)}; every rank's checks are in "
            "health.json of the run folder (resilience.preflight=false starts without them)"
        )
    return report


def recheck(
    device: torch.device, dtype: torch.dtype, run_dir: Path, step: int, corrupt: bool = False
) -> list[dict[str, Any]]:
    """The device's own checks again during training (matmuls and NVML, every
    `resilience.health_interval` steps), gathered from every rank; rank 0 records them in
    health.json under "in_training". Returns the reports of the ranks that failed."""
    start = time.perf_counter()
    ranks = _gather(device, device_checks(device, dtype, corrupt), start)
    failed = _failed(ranks)
    if distributed.rank() == 0:
        path = RunFiles(run_dir).health
        report: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            report = json.loads(path.read_text())
        report["in_training"] = {"step": step, "ok": not failed, "ranks": ranks}
        write_atomic(path, json.dumps(report, indent=1) + "\n")
    return failed


def device_checks(device: torch.device, dtype: torch.dtype, corrupt: bool) -> dict[str, Any]:
    """The checks of the device itself: matmuls in fp32 and the training dtype, and NVML."""
    checks: dict[str, dict[str, Any]] = {}
    for dt in dict.fromkeys((torch.float32, dtype)):
        checks[f"matmul_{str(dt).removeprefix('torch.')}"] = matmul_check(device, dt, corrupt)
    checks["nvml"] = nvml_check(device)
    return checks


def _gather(device: torch.device, checks: dict[str, Any], start: float) -> list[dict[str, Any]]:
    """Every rank's report, in rank order (one all-gather of small objects)."""
    mine = {
        "rank": distributed.rank(),
        "host": socket.gethostname(),
        "device": describe(device),
        "seconds": time.perf_counter() - start,
        "checks": checks,
    }
    world = distributed.world_size()
    if world == 1:
        return [mine]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered


def _failed(ranks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in ranks if any(c["status"] == FAILED for c in r["checks"].values())]


def describe(device: torch.device) -> str:
    """The device as an operator finds it: index, model and UUID on CUDA."""
    if device.type != "cuda":
        return str(device)
    props = torch.cuda.get_device_properties(device)
    return f"{device} ({props.name}, GPU-{props.uuid})"


def refusal(failed: list[dict[str, Any]]) -> str:
    """The failed ranks, each with its host, device, problems and fixes."""
    parts = []
    for r in failed:
        bad = [
            f"{name}: {c['problem']}" for name, c in r["checks"].items() if c["status"] == FAILED
        ]
        fixes = dict.fromkeys(
            c["fix"] for c in r["checks"].values() if c["status"] == FAILED
        )  # in order, once each
        parts.append(
            f"rank {r['rank']} (host {r['host']}, device {r['device']}): {'; '.join(bad)} — "
            f"{'; '.join(fixes)}"
        )
    return f"{len(failed)} rank{'s' if len(failed) > 1 else ''}: " + " | ".join(parts)


def _log(ranks: list[dict[str, Any]]) -> None:
    seconds = max(r["seconds"] for r in ranks)
    bandwidth = [
        r["checks"]["all_reduce"].get("bus_gb_s")
        for r in ranks
        if r["checks"].get("all_reduce", {}).get("status") == OK
    ]
    link = f"; all-reduce {min(bandwidth):.2f} GB/s bus bandwidth" if bandwidth else ""
    logger.info("pre-flight health: %d rank(s) checked in %.2f s%s", len(ranks), seconds, link)
    for r in ranks:
        for name, c in r["checks"].items():
            if c["status"] == WARN:
                logger.warning("pre-flight health, rank %d: %s: %s", r["rank"], name, c["problem"])


# -- compute ----------------------------------------------------------------------------------


def matmul_check(device: torch.device, dtype: torch.dtype, corrupt: bool = False) -> dict[str, Any]:
    """A fixed-seed 256 x 256 product on `device` in `dtype` against float64 on the CPU.

    The reference multiplies the same inputs (already rounded to `dtype`), so only the
    product's own rounding separates the two. Every kernel here accumulates in fp32 (unit
    roundoff u = 2^-24; reduced-precision reductions on CUDA are switched off for the check),
    and an inner product of length k accumulated that way, in any order, is off by at most
    γ_k = k u / (1 - k u) times Σ|a_i b_i| (Higham, Accuracy and Stability, §3.1). Inputs
    that the kernel rounds itself (TF32 for fp32 on CUDA, or a float32_matmul_precision
    below "highest") add 2 u_in per product; rounding the sum to `dtype` adds u_out |c|:

        |c - ref| <= u_out |ref| + (1 + u_out) (γ_k + (1 + γ_k)(2 u_in + u_in²)) (|A| @ |B|)

    The check allows twice that bound. Typical errors are far below it (about √k u |c|), and a
    flipped exponent or high mantissa bit is far above it.
    """
    generator = torch.Generator().manual_seed(_SEED)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator).to(dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=generator).to(dtype)
    ref = a.double() @ b.double()
    scale = a.double().abs() @ b.double().abs()
    with _full_precision_reduction(device):
        out = (a.to(device) @ b.to(device)).cpu()
    if corrupt:
        _flip_bit(out, int(ref.abs().argmax()))
    u_acc = torch.finfo(torch.float32).eps / 2
    gamma = MATMUL_SIZE * u_acc / (1 - MATMUL_SIZE * u_acc)
    u_in = _input_rounding(device, dtype)
    u_out = torch.finfo(dtype).eps / 2
    tolerance = 2 * (
        u_out * ref.abs() + (1 + u_out) * (gamma + (1 + gamma) * (2 * u_in + u_in**2)) * scale
    )
    error = (out.double() - ref).abs()
    bad = ~(error <= tolerance)  # NaN and inf count as bad
    worst = float(error.nan_to_num(math.inf).max())
    result: dict[str, Any] = {
        "max_error": worst,
        "max_allowed": float(tolerance.max()),
        "elements": ref.numel(),
    }
    if not bad.any():
        return {"status": OK, **result}
    index = int((error.nan_to_num(math.inf) / tolerance).argmax())
    row, col = divmod(index, MATMUL_SIZE)
    return {
        "status": FAILED,
        **result,
        "wrong_elements": int(bad.sum()),
        "problem": (
            f"{int(bad.sum())} of {ref.numel()} elements of a {dtype} matmul are wrong, e.g. "
            f"[{row}, {col}] = {float(out[row, col]):.6g} against {float(ref[row, col]):.6g} "
            f"(allowed error {float(tolerance[row, col]):.3g})"
        ),
        "fix": "the device computes wrong results: take it out of the job and relaunch",
    }


@contextlib.contextmanager
def _full_precision_reduction(device: torch.device) -> Iterator[None]:
    """cuBLAS may round bf16/fp16 partial sums to the input type (allowed by default), which
    no small bound covers; the check switches it off and puts it back."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved = (
        matmul.allow_bf16_reduced_precision_reduction,
        matmul.allow_fp16_reduced_precision_reduction,
    )
    matmul.allow_bf16_reduced_precision_reduction = False
    matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        bf16, fp16 = saved
        matmul.allow_bf16_reduced_precision_reduction = bf16
        matmul.allow_fp16_reduced_precision_reduction = fp16


def _input_rounding(device: torch.device, dtype: torch.dtype) -> float:
    """Unit roundoff of what an fp32 matmul rounds its inputs to (0 when it does not)."""
    if dtype != torch.float32:
        return 0.0
    tf32, bf16 = 2.0**-11, 2.0**-8
    precision = torch.get_float32_matmul_precision()
    u = {"highest": 0.0, "high": tf32, "medium": bf16}.get(precision, bf16)
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u = max(u, tf32)
    return u


def _flip_bit(out: torch.Tensor, index: int) -> None:
    """One bit flip, as silent data corruption looks: the lowest exponent bit of element
    `index`, which doubles or halves it."""
    int_dtype, bit = _FLOAT_BITS[out.dtype]
    out.view(-1).view(int_dtype)[index] ^= 1 << bit


# -- the GPU's own state ----------------------------------------------------------------------


def nvml_check(device: torch.device) -> dict[str, Any]:
    """ECC, temperature and throttling of this process's GPU from NVML."""
    if device.type != "cuda":
        return {"status": NOT_CHECKED, "reason": "not a CUDA device"}
    try:
        import pynvml
    except ImportError:
        return {
            "status": NOT_CHECKED,
            "reason": "pynvml is not installed (pip install nvidia-ml-py)",
        }
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return {"status": NOT_CHECKED, "reason": f"NVML: {e}"}
    try:
        uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}"
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        return nvml_verdict(read_nvml(pynvml, handle))
    except pynvml.NVMLError as e:
        return {"status": NOT_CHECKED, "reason": f"NVML: {e}"}
    finally:
        pynvml.nvmlShutdown()


def read_nvml(pynvml: Any, handle: Any) -> dict[str, int | None]:
    """The readings `nvml_verdict` judges; None for each the GPU or driver does not offer."""

    def reading(query: Any, *query_args: Any) -> Any:
        try:
            return query(handle, *query_args)
        except pynvml.NVMLError:
            return None

    remapped = reading(
        pynvml.nvmlDeviceGetRemappedRows
    )  # (corrected, uncorrected, pending, failed)
    reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        pynvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None
    )
    return {
        "ecc_uncorrected_volatile": reading(
            pynvml.nvmlDeviceGetTotalEccErrors,
            pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
            pynvml.NVML_VOLATILE_ECC,
        ),
        "row_remap_pending": None if remapped is None else int(remapped[2]),
        "row_remap_failed": None if remapped is None else int(remapped[3]),
        "temperature_c": reading(pynvml.nvmlDeviceGetTemperature, pynvml.NVML_TEMPERATURE_GPU),
        "slowdown_temperature_c": reading(
            pynvml.nvmlDeviceGetTemperatureThreshold,
            pynvml.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN,
        ),
        "clock_event_reasons": None if reasons is None else reading(reasons),
    }


def nvml_verdict(readings: dict[str, int | None]) -> dict[str, Any]:
    """Judge NVML readings; what is missing is listed as not checked, never failed."""
    problems, fixes = [], []
    ecc = readings.get("ecc_uncorrected_volatile")
    if ecc:
        problems.append(f"{ecc} uncorrectable ECC memory errors since the driver loaded")
        fixes.append("reset the GPU (nvidia-smi -r) or replace it")
    if readings.get("row_remap_failed"):
        problems.append("a memory row remapping failed")
        fixes.append("replace the GPU")
    elif readings.get("row_remap_pending"):
        problems.append("a memory row remapping is pending")
        fixes.append("reset the GPU (nvidia-smi -r) to apply it")
    temp, limit = readings.get("temperature_c"), readings.get("slowdown_temperature_c")
    if temp is not None and limit and temp >= limit:
        problems.append(f"{temp} °C, at or above its slowdown threshold of {limit} °C")
        fixes.append("check the node's cooling")
    reasons = readings.get("clock_event_reasons")
    slowing = [name for bit, name in _HW_SLOWDOWN.items() if reasons and reasons & bit]
    if slowing:
        problems.append(f"clocks throttled: {', '.join(slowing)}")
        fixes.append("check the node's cooling and power")
    result: dict[str, Any] = {"status": FAILED if problems else OK, **readings}
    missing = [name for name, value in readings.items() if value is None]
    if missing:
        result["not_checked"] = missing
    if problems:
        result["problem"] = "; ".join(problems)
        result["fix"] = "; ".join(dict.fromkeys(fixes))
    return result


# -- memory and disk --------------------------------------------------------------------------


def memory_check(device: torch.device, needed_bytes: float | None) -> dict[str, Any]:
    """Free memory against the planner's predicted peak. On a CPU the host's ranks share its
    RAM, so the need is per rank times the ranks on this host."""
    if needed_bytes is None:
        return {"status": NOT_CHECKED, "reason": "no prediction"}
    if device.type == "cuda":
        free = float(torch.cuda.mem_get_info(device)[0])
        sharing = 1
    else:
        available = _mem_available()
        if available is None:
            return {"status": NOT_CHECKED, "reason": "no /proc/meminfo"}
        free, sharing = available, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    need = needed_bytes * sharing
    result = {"free_gib": free / 2**30, "predicted_gib": need / 2**30}
    if free >= need:
        return {"status": OK, **result}
    return {
        "status": WARN,
        **result,
        "problem": f"{free / 2**30:.1f} GiB free, the planner predicts {need / 2**30:.1f} GiB",
    }


def _mem_available() -> float | None:
    with contextlib.suppress(OSError):  # Linux only
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024.0
    return None


def disk_check(run_dir: Path, needed_bytes: float) -> dict[str, Any]:
    """Free space where the checkpoints go (the run folder, or its nearest existing parent)."""
    place = run_dir
    while not place.exists() and place != place.parent:
        place = place.parent
    free = float(shutil.disk_usage(place).free)
    result = {"free_gib": free / 2**30, "checkpoints_gib": needed_bytes / 2**30}
    if free >= needed_bytes:
        return {"status": OK, **result}
    return {
        "status": WARN,
        **result,
        "problem": (
            f"{free / 2**30:.1f} GiB free at {place}, the checkpoints kept need about "
            f"{needed_bytes / 2**30:.1f} GiB (lower checkpoint.keep or free space)"
        ),
    }


# -- the links between ranks ------------------------------------------------------------------


def all_reduce_check(device: torch.device, nbytes: int = ALL_REDUCE_BYTES) -> dict[str, Any]:
    """Sum a known int32 pattern over all ranks: rank r sends (r + 1) * p_i with p_i cycling
    1..251, so every element must come out exactly world (world + 1) / 2 * p_i. The first
    all-reduce connects the ranks (NCCL sets up lazily) and is checked too; the second is
    timed for the bus bandwidth (2 (n - 1) / n x bytes / s, as nccl-tests reports it)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n = nbytes // 4
    pattern = torch.arange(n, dtype=torch.int32, device=device) % _PATTERN + 1
    expected = pattern * (world * (world + 1) // 2)
    wrong = 0
    seconds = 0.0
    for _ in range(2):
        value = pattern * (rank + 1)
        _synchronize(device)
        start = time.perf_counter()
        dist.all_reduce(value)
        _synchronize(device)
        seconds = time.perf_counter() - start
        wrong = max(wrong, int((value != expected).sum()))
    result: dict[str, Any] = {
        "bytes": n * 4,
        "seconds": seconds,
        "bus_gb_s": 2 * (world - 1) / world * n * 4 / seconds / 1e9,
        "backend": str(dist.get_backend()),
    }
    if not wrong:
        return {"status": OK, **result}
    return {
        "status": FAILED,
        **result,
        "problem": f"an all-reduce over {world} ranks gave {wrong} wrong elements of {n}",
        "fix": (
            "a link between ranks corrupts data: check this host's network / NVLink "
            "(NCCL_DEBUG=INFO names the transport) and relaunch without it"
        ),
    }


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
