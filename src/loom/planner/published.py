"""The planner against the older published runs (reference/published_runs.json, a copy of the
team's shared/reference/published_runs.json): held out, as no constant is fitted on them
(loom.planner.validation fits on its own records).

Each check turns a record into a spec, predicts, and returns rows of (record, predicted,
published, relative error). Assumptions where a record is silent: GPT blocks (the papers'
architecture), 16-bit Megatron-style states, micro-batch 1, no interleaving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from loom.planner.cost import DEFAULT_CALIBRATION, Calibration
from loom.planner.memory import activation_bytes_per_layer, model_state_bytes
from loom.planner.search import Plan, evaluate
from loom.planner.spec import (
    MODEL_KEYS,
    STRATEGY_KEYS,
    ModelShape,
    PlanSpec,
    Strategy,
    parse_spec,
)

DEFAULT_RECORDS = Path(__file__).resolve().parents[3] / "reference" / "published_runs.json"


@dataclass(frozen=True)
class Row:
    record: str
    quantity: str
    predicted: float
    published: float

    @property
    def error(self) -> float:
        return self.predicted / self.published - 1


def load_records(path: Path = DEFAULT_RECORDS) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in json.loads(Path(path).read_text())}


def record_spec(record: dict[str, Any], **strategy: Any) -> PlanSpec:
    """The spec of a record: its shape and layout fields (the descriptive ones, such as
    params_stated or the optimizer's name, stay out), on A100s."""
    model = {k: v for k, v in record["model"].items() if k in MODEL_KEYS}
    model["arch"] = "gpt"
    model["vocab"] = model.get("vocab") or 51200
    model["kv_heads"] = model.get("kv_heads") or model["heads"]
    model["ffn_hidden"] = model.get("ffn_hidden") or 4 * model["hidden"]
    layout = (record.get("strategy") or {}).items()
    raw = {k: v for k, v in layout if v is not None and k in STRATEGY_KEYS}
    raw.update(micro_batch=raw.get("micro_batch", 1), framework="megatron", precision="fp16")
    raw.update(flash_attention=False)  # 2021-22: attention as batched matmuls + softmax
    raw.pop("zero_stage", None)
    raw.update(strategy)
    hardware = {"gpu": "a100", "n_gpus": record["hardware"]["n_gpus"]}
    return parse_spec({"model": model, "hardware": hardware, "strategy": raw})


def megatron_flops(model: ModelShape, batch: int) -> float:
    """Narayanan et al. eq. (3): FLOPs per iteration with full recomputation."""
    b, s, layers, h, v = batch, model.seq_len, model.layers, model.hidden, model.vocab
    return 96 * b * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))


def _predicted(
    records: dict[str, dict[str, Any]], prefix: str, cal: Calibration
) -> Iterator[tuple[str, dict[str, Any], PlanSpec, Plan]]:
    """Each record whose id starts with `prefix`, its spec and the planner's prediction."""
    for rid, r in records.items():
        if rid.startswith(prefix):
            spec = record_spec(r)
            assert spec.strategy is not None
            yield rid, r, spec, evaluate(spec.model, spec.hardware, spec.strategy, cal)


def megatron_throughput(
    records: dict[str, dict[str, Any]], cal: Calibration = DEFAULT_CALIBRATION
) -> list[Row]:
    """Table 1: TFLOP/s per GPU (eq. 3 FLOPs over the predicted iteration time)."""
    rows = []
    for rid, r, spec, plan in _predicted(records, "meg21_T1_", cal):
        assert spec.strategy is not None
        flops = megatron_flops(spec.model, spec.strategy.global_batch)
        x = flops / (plan.devices * plan.time.total) / 1e12
        rows.append(Row(rid, "TFLOP/s per GPU", x, r["measured"]["teraflops_per_gpu"]))
    return rows


def korthikanti_times(
    records: dict[str, dict[str, Any]], cal: Calibration = DEFAULT_CALIBRATION
) -> list[Row]:
    """Table 5: end-to-end iteration time, selective + sequence parallel and full recompute."""
    return [
        Row(rid, "iteration s", plan.time.total, r["measured"]["iteration_time_s"])
        for rid, r, _, plan in _predicted(records, "kor22_T5_", cal)
    ]


def korthikanti_layer_times(
    records: dict[str, dict[str, Any]], cal: Calibration = DEFAULT_CALIBRATION
) -> list[Row]:
    """Table 4: forward + backward ms of one 22B block (22B, tp 8): the predicted step's compute
    and tensor-parallel time with the block count one lower, subtracted."""
    rows = []
    for rid, r, spec, plan in _predicted(records, "kor22_T4_", cal):
        assert spec.strategy is not None
        fewer = replace(spec.model, layers=spec.model.layers - 1)
        less = evaluate(fewer, spec.hardware, spec.strategy, cal).time
        layer = plan.time.compute + plan.time.tensor_parallel - less.compute - less.tensor_parallel
        rows.append(Row(rid, "ms per layer", layer * 1e3, r["measured"]["combined_ms_per_layer"]))
    return rows


def zero_memory(records: dict[str, dict[str, Any]]) -> list[Row]:
    """ZeRO Table 1: model-state GB per device for P_os, P_os+g, P_os+g+p."""
    rows = []
    columns = {1: "Pos", 2: "Pos+g", 3: "Pos+g+p"}
    for rid, r in records.items():
        if not rid.startswith("zero20_T1_"):
            continue
        params, dp = r["model"]["params"], r["strategy"]["dp"]
        for stage, column in columns.items():
            s = Strategy(dp=dp, zero_stage=stage, framework="megatron", precision="fp16")
            predicted = sum(model_state_bytes(params, s)) / 1e9
            published = r["measured"][f"model_state_GB_per_device_{column}"]
            rows.append(Row(f"{rid} {column}", "model states GB", predicted, published))
    return rows


def korthikanti_activations() -> list[Row]:
    """The activation formulas of Korthikanti et al. (bytes per layer), term by term, for the
    22B model of their Table 3 (s=2048, b=4, h=6144, a=64, t=8)."""
    s_, b, h, a, t = 2048, 4, 6144, 64, 8
    model = ModelShape(48, h, a, a, 4 * h, 51200, s_, arch="gpt")
    sbh = s_ * b * h
    cases = {
        "no parallelism": (Strategy(tp=1, micro_batch=b), sbh * (34 + 5 * a * s_ / h)),
        "tensor parallel": (
            Strategy(tp=t, micro_batch=b),
            sbh * (10 + 24 / t + 5 * a * s_ / (h * t)),
        ),
        "tensor + sequence parallel": (
            Strategy(tp=t, sp=True, micro_batch=b),
            sbh / t * (34 + 5 * a * s_ / h),
        ),
        "tensor parallel + selective": (
            Strategy(tp=t, recompute="selective", micro_batch=b),
            sbh * (10 + 24 / t),
        ),
        "tensor + sequence parallel + selective": (
            Strategy(tp=t, sp=True, recompute="selective", micro_batch=b),
            34 * sbh / t,
        ),
        "full recompute": (Strategy(tp=t, recompute="full", micro_batch=b), 2 * sbh),
    }
    return [
        Row(name, "activation bytes per layer", activation_bytes_per_layer(model, s), formula)
        for name, (s, formula) in cases.items()
    ]


# The layouts behind the two time estimates of Narayanan et al. §5.1 (not stated there for
# 175B: tp 8 × pp 16 × dp 8 is what their Table 1 uses at that scale; 1T: Table 1's row).
TIME_ESTIMATES = {
    "meg21_time_gpt3_175B": {"tp": 8, "pp": 16, "micro_batch": 1},
    "meg21_time_1T": {"tp": 8, "pp": 64, "micro_batch": 1},
}


def training_days(
    records: dict[str, dict[str, Any]], cal: Calibration = DEFAULT_CALIBRATION
) -> list[Row]:
    rows = []
    for rid, layout in TIME_ESTIMATES.items():
        r = records[rid]
        spec = record_spec(r, recompute="full", **layout)
        assert spec.strategy is not None
        strategy = replace(spec.strategy, global_batch=r["strategy"]["global_batch"])
        plan = evaluate(spec.model, spec.hardware, strategy, cal)
        tokens = r["measured"]["training_tokens"]
        # Days as the paper counts them: its FLOPs per token (eq. 3, 8·P with recomputation)
        # at the predicted per-GPU rate.
        x = megatron_flops(spec.model, strategy.global_batch) / (plan.devices * plan.time.total)
        per_token = megatron_flops(spec.model, 1) / spec.model.seq_len
        days = tokens * per_token / (plan.devices * x) / 86400
        rows.append(Row(rid, "training days", days, r["measured"]["end_to_end_training_days"]))
    return rows
