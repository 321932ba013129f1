"""The planner's answer: the JSON contract of DESIGN.md, or a table with the reason the winner
wins."""

from __future__ import annotations

from typing import Any

from loom.planner.layout import command_line
from loom.planner.search import Plan
from loom.planner.spec import ModelShape, PlanSpec, loom_refusal

BOTTLENECK_WORDS = {
    "compute": "compute itself (communication and bubbles are under 10% of the step)",
    "bubble": "the pipeline bubble",
    "tensor_parallel": "tensor-parallel communication",
    "data_parallel": "data-parallel communication (gradient reduction, FSDP gathers)",
    "pipeline": "pipeline point-to-point traffic",
    "context_parallel": "context-parallel K/V traffic",
    "expert_parallel": "expert-parallel all-to-all (tokens to their experts and back)",
    "offload": "offload (host-link traffic, the CPU optimizer step, NVMe reads and writes)",
    "optimizer": "the optimizer step",
    "overhead": "fixed per-step overhead",
}


def layout(plan: Plan) -> dict[str, Any]:
    s = plan.strategy
    return {
        "tp": s.tp,
        "pp": s.pp,
        "dp": s.dp,
        "cp": s.cp,
        "sp": s.sp,
        "zero_stage": s.zero_stage,
        "recompute": s.recompute,
        "micro_batch": s.micro_batch,
        "global_batch": s.global_batch,
        "virtual_stages": s.virtual_stages,
        "schedule": s.schedule,
        "offload": s.offload,
        "offload_nvme": s.offload_nvme,
        "activation_offload": s.activation_offload,
        "precision": s.precision,
        "ep": s.ep,
        "moe_imbalance": s.moe_imbalance,
    }


def summary(plan: Plan, tokens: float | None, model: ModelShape | None = None) -> dict[str, Any]:
    """The plan's figures; with `model`, the `loom train` / `loom finetune` command that runs
    it (where Loom runs it as it is)."""
    out: dict[str, Any] = {
        "strategy": layout(plan),
        "fits": plan.fits,
        "memory_gib": {k: round(v, 3) for k, v in plan.memory.gib().items()},
        "host_memory_gib_per_device": round(plan.memory.host / 2**30, 3),
        "disk_gib_per_device": round(plan.memory.disk / 2**30, 3),
        "step_time_s": plan.time.total,
        "step_time_breakdown_s": plan.time.breakdown(),
        "bottleneck": plan.time.bottleneck,
        "tflops_per_gpu": plan.tflops_per_device,
        "mfu": plan.mfu,
        "tokens_per_s": plan.tokens_per_s,
    }
    if tokens:
        out["train_days"] = plan.days(tokens)
        out["device_hours"] = plan.days(tokens) * 24 * plan.devices
    if model is not None and runnable(plan):
        out["loom_command"] = command_line(model, plan.strategy, plan.memory)
    return out


def runnable(plan: Plan) -> bool:
    """A Loom layout `loom train` / `loom finetune` takes as it is."""
    return plan.strategy.framework == "loom" and loom_refusal(plan.strategy) is None


def to_json(spec: PlanSpec, best: Plan, ranked: list[Plan]) -> dict[str, Any]:
    result = summary(best, spec.training_tokens, spec.model)
    result["model_params"] = spec.model.params()
    result["devices"] = spec.hardware.devices
    if spec.strategy is None:
        result["best"] = summary(best, spec.training_tokens, spec.model)
        result["candidates"] = [summary(p, spec.training_tokens, spec.model) for p in ranked]
        result["why"] = why(best, ranked)
    return result


def why(best: Plan, ranked: list[Plan]) -> str:
    parts = best.time.breakdown()
    total = best.time.total
    worst = best.time.bottleneck
    share = parts.get(worst, 0.0) / total if worst != "compute" else parts["compute"] / total
    text = (
        f"fastest layout ({best.mfu:.0%} MFU); its limit is {BOTTLENECK_WORDS[worst]}"
        f" ({share:.0%} of the step)"
    )
    if len(ranked) > 1:
        runner = ranked[1]
        loss = 1 - runner.tokens_per_s / best.tokens_per_s
        text += (
            f"; the next best ({describe(runner)}) is {loss:.0%} slower, limited by "
            f"{BOTTLENECK_WORDS[runner.time.bottleneck]}"
        )
    return text


def describe(plan: Plan) -> str:
    s = plan.strategy
    degrees = f"tp{s.tp} pp{s.pp} dp{s.dp}" + (f" cp{s.cp}" if s.cp > 1 else "")
    degrees += f" ep{s.ep}" if s.ep > 1 else ""
    words = [degrees, f"mb{s.micro_batch}", f"zero{s.zero_stage}"]
    if s.virtual_stages > 1:
        words.append(f"v{s.virtual_stages}")
    if s.pp > 1:
        words.append(s.schedule)
    if s.recompute != "none":
        words.append(f"{s.recompute} recompute")
    if s.offload != "none":
        words.append(f"offload {s.offload}" + (" to nvme" if s.offload_nvme else ""))
    if s.activation_offload:
        words.append("offload activations")
    return " ".join(words)


def print_table(spec: PlanSpec, best: Plan, ranked: list[Plan]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(120, Console().width))
    m, hw = spec.model, spec.hardware
    console.print(
        f"[bold]{m.params() / 1e9:.2f}B parameters[/], {m.layers} layers, seq {m.seq_len}; "
        f"{hw.devices} × {hw.name} ({hw.memory_gb:g} GB)"
    )
    table = Table()
    for column in ("layout", "memory GiB", "step s", "tokens/s", "TFLOP/s/dev", "MFU", "limit"):
        table.add_column(column, justify="left" if column in ("layout", "limit") else "right")
    if spec.training_tokens:
        table.add_column("days", justify="right")
    for p in ranked:
        row = [
            describe(p),
            f"{p.memory.total / 2**30:.1f}" + ("" if p.fits else " (does not fit)"),
            f"{p.time.total:.3g}",
            f"{p.tokens_per_s:,.0f}",
            f"{p.tflops_per_device:.0f}",
            f"{p.mfu:.1%}",
            p.time.bottleneck,
        ]
        if spec.training_tokens:
            row.append(f"{p.days(spec.training_tokens):.1f}")
        table.add_row(*row)
    console.print(table)
    mem = best.memory.gib()
    console.print(
        "memory per device (GiB): "
        + ", ".join(f"{k} {v:.2f}" for k, v in mem.items())
        + (f"; host {best.memory.host / 2**30:.1f} GiB per device" if best.memory.host else "")
        + (f"; disk {best.memory.disk / 2**30:.1f} GiB per device" if best.memory.disk else "")
    )
    if spec.strategy is None:
        console.print(why(best, ranked))
    if runnable(best):
        console.print("run it: " + command_line(m, best.strategy, best.memory), soft_wrap=True)
