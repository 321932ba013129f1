"""The planner against independently published training runs (reference/validation_runs.json):
each record as a spec, the throughput it published as tokens/s per GPU, and a fixed split into
the records the calibration is fitted on and the held-out records accuracy is reported on.

Records publish tokens/s per GPU, a step time, TFLOP/s per GPU or MFU; the last two are turned
into tokens/s with the source's own FLOPs count, which for every such source here is
6·(matmul + head parameters) + 12·L·H·Q·T per token — Loom's `model_flops_per_token`.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from loom.core.errors import LoomError
from loom.planner.cost import DEFAULT_CALIBRATION, Calibration, model_flops_per_token
from loom.planner.search import VIRTUAL_STAGES, evaluate
from loom.planner.spec import PlanSpec, Strategy, check_strategy, gpu_hardware, parse_model

VALIDATION_RECORDS = Path(__file__).resolve().parents[3] / "reference" / "validation_runs.json"

# Frameworks built on Megatron-Core (fused Transformer Engine kernels, 16-bit weights and
# gradients with an fp32 master copy); the rest are PyTorch FSDP codebases in eager mode.
MEGATRON_STYLE = ("nemo", "megatron", "meta-internal")
# GPU names in the records that are a table GPU with other memory, bandwidth or power.
GPU_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "h100-96gb-500w": ("h100", {"memory_gb": 96, "hbm_gbps": 2400, "power_limit_w": 500}),
}


@dataclass(frozen=True)
class Case:
    """One record: the planner's question and the published answer (tokens/s per GPU)."""

    id: str
    source: str
    spec: PlanSpec
    published: float
    fitted: bool  # in the part the calibration is fitted on
    confidence: str
    refused: str = ""  # why the planner refuses the published layout (then it is not scored)
    tuned: tuple[str, ...] = ()  # unpublished settings the team tuned (the planner tunes them)

    @property
    def scored(self) -> bool:
        """Counted in the accuracy target: a layout the planner accepts, stated with at least
        medium confidence by the record."""
        return not self.refused and self.confidence != "low"


@dataclass(frozen=True)
class Result:
    case: Case
    predicted: float  # tokens/s per GPU

    @property
    def error(self) -> float:
        return self.predicted / self.case.published - 1


def load_cases(path: Path = VALIDATION_RECORDS) -> list[Case]:
    records = json.loads(Path(path).read_text())
    return [_case(r, fitted) for r, fitted in zip(records, fit_split(records), strict=True)]


def fit_split(records: list[dict[str, Any]]) -> list[bool]:
    """Which records the constants are fitted on: within each source, every third record in id
    order (a fixed rule decided before looking at errors), never a low-confidence one. The
    other two thirds are held out."""
    chosen: dict[str, bool] = {}
    by_source: dict[str, list[str]] = {}
    for r in records:
        by_source.setdefault(source_of(r), []).append(r["id"])
    for ids in by_source.values():
        for i, rid in enumerate(sorted(ids)):
            chosen[rid] = i % 3 == 0
    return [chosen[r["id"]] and r.get("confidence") != "low" for r in records]


def source_of(record: dict[str, Any]) -> str:
    source = record["source"]
    return str(source.get("repo") or source.get("title"))


def _case(r: dict[str, Any], fitted: bool) -> Case:
    spec = record_spec(r)
    assert spec.strategy is not None
    try:
        check_strategy(spec.model, spec.hardware, spec.strategy)
        refused = ""
    except LoomError as e:
        refused = str(e)
    published = published_tokens_per_s(r, spec)
    tuned = tuple(k for k in TUNED if r["strategy"].get(k) is None and spec.strategy.pp > 1)
    return Case(
        r["id"],
        source_of(r),
        spec,
        published,
        fitted and not refused,
        r["confidence"],
        refused,
        tuned,
    )


# Pipeline settings a team tunes and a table may leave out: then the planner picks the fastest
# value that fits, as the team did.
TUNED = ("micro_batch", "virtual_stages")


def record_spec(r: dict[str, Any]) -> PlanSpec:
    m, hw, st = r["model"], r["hardware"], r["strategy"]
    model = parse_model(
        {
            k: m[k]
            for k in (
                "layers",
                "hidden",
                "heads",
                "kv_heads",
                "ffn_hidden",
                "vocab",
                "seq_len",
                "arch",
            )
            if m.get(k) is not None
        }
    )
    gpu, overrides = GPU_VARIANTS.get(hw["gpu"], (hw["gpu"], {}))
    if hw.get("gpus_per_node") and not gpu.startswith("gb"):  # GB200/300: NVLink domain of 72
        overrides = {**overrides, "devices_per_node": hw["gpus_per_node"]}
    hardware = gpu_hardware(gpu, hw["n_gpus"], **overrides)
    framework = "megatron" if r["framework"].startswith(MEGATRON_STYLE) else "pytorch"
    known = {f.name for f in fields(Strategy)}
    values = {k: v for k, v in st.items() if k in known and v is not None}
    values.setdefault("micro_batch", 1)
    values.setdefault("virtual_stages", 1)
    values["sp"] = bool(values.get("sp")) or (values.get("tp", 1) > 1 and framework == "megatron")
    values["zero_stage"] = values.get("zero_stage") or 0
    if values.get("dp_shard") == values.get("dp"):
        values.pop("dp_shard", None)
    pp, v = values.get("pp", 1), values["virtual_stages"]
    schedule = "Interleaved1F1B" if v > 1 else "1F1B"
    strategy = Strategy(**values, framework=framework, schedule=schedule if pp > 1 else "1F1B")
    return PlanSpec(model, hardware, strategy)


def published_tokens_per_s(r: dict[str, Any], spec: PlanSpec) -> float:
    """Tokens/s per GPU as published, or from the step time, TFLOP/s or MFU it published."""
    measured = r["measured"]
    s = spec.strategy
    assert s is not None
    if measured.get("tokens_per_s_per_gpu"):
        return float(measured["tokens_per_s_per_gpu"])
    if measured.get("step_time_s"):
        tokens = s.global_batch * spec.model.seq_len
        return tokens / measured["step_time_s"] / spec.hardware.devices
    per_token = model_flops_per_token(spec.model, replace(s, finetune="full"))
    if measured.get("tflops_per_gpu"):
        return measured["tflops_per_gpu"] * 1e12 / per_token
    peak = spec.hardware.peak_tflops[s.precision if s.precision != "fp8" else "bf16"] * 1e12
    return float(measured["mfu"]) * peak / per_token


def predict(case: Case, cal: Calibration = DEFAULT_CALIBRATION) -> Result:
    spec = case.spec
    assert spec.strategy is not None
    plans = [evaluate(spec.model, spec.hardware, s, cal) for s in _layouts(case)]
    fitting = [p for p in plans if p.fits] or plans
    best = max(fitting, key=lambda p: p.tokens_per_s)
    return Result(case, best.tokens_per_s / spec.hardware.devices)


def _layouts(case: Case) -> list[Strategy]:
    """The published layout, with each tuned setting over the values the search tries."""
    s, layers = case.spec.strategy, case.spec.model.layers
    assert s is not None
    per_replica = s.global_batch // s.dp
    micro = (
        [b for b in (1, 2, 4, 8) if per_replica % b == 0]
        if "micro_batch" in case.tuned
        else [s.micro_batch]
    )
    virtual = (
        [v for v in VIRTUAL_STAGES if s.pp * v <= layers]
        if "virtual_stages" in case.tuned
        else [s.virtual_stages]
    )
    return [
        replace(s, micro_batch=b, virtual_stages=v, schedule="Interleaved1F1B" if v > 1 else "1F1B")
        for b in micro
        for v in virtual
    ]


def results(cases: list[Case], cal: Calibration = DEFAULT_CALIBRATION) -> list[Result]:
    return [predict(c, cal) for c in cases]


def summary(rows: list[Result]) -> tuple[float, float]:
    """Median and largest |error|."""
    errors = [abs(r.error) for r in rows]
    return statistics.median(errors), max(errors)


# The constants fitted, with the range a physical reading allows.
FITTED = {
    "matmul_efficiency": (0.5, 0.95),
    "half_size": (16.0, 512.0),
    "fp8_efficiency": (0.25, 0.95),
    "attention_efficiency": (0.2, 1.0),
    "elementwise_passes": (4.0, 160.0),
    "fused_elementwise": (0.1, 1.0),
    "kernel_launch_s": (1e-6, 200e-6),
    "hop_latency_s": (1e-9, 2e-5),
    "tp_overlap": (0.0, 0.9),
    "power_exponent": (0.0, 1.5),
    "generic_attention": (0.2, 1.0),
}


def fit_calibration(
    cases: list[Case], start: Calibration = DEFAULT_CALIBRATION, names: tuple[str, ...] = ()
) -> Calibration:
    """Least squares on log(predicted / published) over `cases` (robust to a few outliers)."""
    import numpy as np
    from scipy.optimize import least_squares

    names = names or tuple(FITTED)
    low = np.array([FITTED[n][0] for n in names])
    high = np.array([FITTED[n][1] for n in names])
    scale = high - low

    def calibration(x: Any) -> Calibration:
        return replace(start, **{n: float(v) for n, v in zip(names, low + x * scale, strict=True)})

    def residuals(x: Any) -> Any:
        cal = calibration(x)
        return np.array([np.log(predict(c, cal).predicted / c.published) for c in cases])

    x0 = np.clip(
        [(getattr(start, n) - lo) / s for n, lo, s in zip(names, low, scale, strict=True)], 0.0, 1.0
    )
    solution = least_squares(residuals, x0, bounds=(0.0, 1.0), loss="soft_l1", f_scale=0.1)
    return calibration(solution.x)
