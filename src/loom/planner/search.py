"""Evaluate one layout, or search every valid one and rank those that fit by throughput."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

from loom.core.errors import LoomError
from loom.planner.cost import DEFAULT_CALIBRATION, Calibration, StepTime, step_time
from loom.planner.memory import GB, Memory, estimate, fits
from loom.planner.spec import (
    Hardware,
    ModelShape,
    PlanSpec,
    Strategy,
    check_strategy,
    finetune_refusal,
    loom_refusal,
)

DEFAULT_BATCH_TOKENS = 4e6  # sequences per step when none is given: about 4M tokens


@dataclass(frozen=True)
class Plan:
    strategy: Strategy
    memory: Memory
    time: StepTime
    fits: bool
    devices: int
    peak_flops: float  # per device
    seq_len: int

    @property
    def tokens_per_s(self) -> float:
        """Whole job, all devices."""
        return self.strategy.global_batch * self.seq_len / self.time.total

    @property
    def tflops_per_device(self) -> float:
        return self.time.model_flops / self.time.total / self.devices / 1e12

    @property
    def mfu(self) -> float:
        return self.time.model_flops / self.time.total / (self.devices * self.peak_flops)

    def days(self, tokens: float) -> float:
        return tokens / self.tokens_per_s / 86400


def evaluate(
    model: ModelShape, hw: Hardware, s: Strategy, cal: Calibration = DEFAULT_CALIBRATION
) -> Plan:
    memory = estimate(model, hw, s)
    return _plan(model, hw, s, memory, cal)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(
    model: ModelShape,
    hw: Hardware,
    base: Strategy,
    global_batch: int,
    fixed: frozenset[str] = frozenset(),
) -> list[Strategy]:
    """Every layout of `hw.devices` devices this model and batch allow; fields named in `fixed`
    keep `base`'s value. Pipelines may split the layers unevenly (as `loom train` does), context
    parallelism splits sequences of at least 2,048 tokens per rank into 2 · cp chunks. The
    recompute modes come last, least recomputation first, so a search can stop at the first
    one that fits."""
    devices = hw.devices
    tps = [
        t
        for t in (1, 2, 4, 8, 16)
        if t <= hw.devices_per_node
        and devices % t == 0
        and model.heads % t == 0
        and (model.kv_heads % t == 0 or t % model.kv_heads == 0)
    ]
    cps = [
        c
        for c in (1, 2, 4, 8, 16, 32)
        if model.seq_len % (2 * c) == 0 and (c == 1 or model.seq_len // c >= 2048)
    ]
    if "cp" in fixed:
        cps = [base.cp]
    micro = (base.micro_batch,) if "micro_batch" in fixed else (1, 2, 4, 8)
    modes = (base.recompute,) if "recompute" in fixed else ("none", "selective", "full")
    out: list[Strategy] = []
    for tp, cp in itertools.product(tps, cps):
        if devices % (tp * cp):
            continue
        loom = base.framework == "loom"
        for pp in _divisors(devices // (tp * cp)):
            if pp > model.layers:
                break
            dp = devices // (tp * cp * pp)
            if global_batch % dp:
                continue
            per_replica = global_batch // dp
            # loom train runs DDP or FSDP (ZeRO 0 or 3), FSDP over the dp and cp ranks when it
            # splits sequences, and no zero-bubble schedule of its own.
            sharded = (0, 3) if loom else (1, 3)
            zeros = (base.zero_stage,) if "zero_stage" in fixed else ((0,) if dp == 1 else sharded)
            if loom and cp > 1 and "zero_stage" not in fixed:
                zeros = (3,)
            for v in VIRTUAL_STAGES if pp > 1 else (1,):
                if pp * v > model.layers:
                    continue
                schedules = (
                    ["1F1B"]
                    if pp == 1
                    else (
                        ["Interleaved1F1B"]
                        if v > 1
                        else ["1F1B"] + ([] if loom else ["ZeroBubble"])
                    )
                )
                for mb, schedule, zero, recompute in itertools.product(
                    micro, schedules, zeros, modes
                ):
                    if per_replica % mb:
                        continue
                    layout = replace(
                        base,
                        tp=tp,
                        pp=pp,
                        dp=dp,
                        cp=cp,
                        sp=tp > 1,
                        micro_batch=mb,
                        global_batch=global_batch,
                        virtual_stages=v,
                        schedule=schedule,
                        recompute=recompute,
                        zero_stage=zero,
                        offload="none",
                    )
                    if not finetune_refusal(layout):
                        out.append(layout)
                    if expert_parallel(model, layout) and "ep" not in fixed:
                        out.append(replace(layout, ep=dp * (cp if loom else 1)))
    return out


def expert_parallel(model: ModelShape, s: Strategy) -> bool:
    """Whether `s` may also run with its experts split over its FSDP ranks as `loom train` does
    (ep = dp × cp under ZeRO-3; other frameworks: ep = dp)."""
    loom = s.framework == "loom"
    ranks = s.dp * (s.cp if loom else 1)
    return (
        model.moe_layers > 0
        and ranks > 1
        and model.experts % ranks == 0
        and (not loom or s.zero_stage == 3)
    )


VIRTUAL_STAGES = (1, 2, 3, 4, 6, 8)


def search(spec: PlanSpec, cal: Calibration = DEFAULT_CALIBRATION, keep: int = 10) -> list[Plan]:
    """Plans that fit, fastest first; offload is tried only for layouts that do not fit."""
    model, hw = spec.model, spec.hardware
    global_batch = _global_batch(spec)
    fitting: list[Plan] = []
    offloadable: list[Strategy] = []
    fitted: set[Strategy] = set()  # layouts that fit with less recomputation
    for s in candidates(model, hw, spec.base, global_batch, spec.fixed):
        if replace(s, recompute="none") in fitted:
            continue  # less recomputation fits, and is faster
        memory = estimate(model, hw, s)
        if fits(memory, hw):
            fitted.add(replace(s, recompute="none"))
            fitting.append(_plan(model, hw, s, memory, cal))
        elif memory.total > hw.memory_gb * GB:
            offloadable.append(s)
    if not fitting:
        for s in offloadable:
            for moved in offload_tiers(s, hw, spec.unbuilt):
                memory = estimate(model, hw, moved)
                if fits(memory, hw):
                    fitting.append(_plan(model, hw, moved, memory, cal))
                    break  # the cheapest tier that fits this layout
    fitting.sort(key=lambda p: (-p.tokens_per_s, p.memory.total))
    return fitting[:keep]


# The offload tiers, cheapest first (the traffic each adds to a step): (offload, activation
# offload, NVMe). Activations alone copy what the compute mostly hides; the optimizer tier moves
# 16-bit gradients and weights once a step and steps on the CPUs; FSDP's params tier moves every
# weight shard every micro-batch; the NVMe tier reads and writes the optimizer state as well.
TIERS = (
    ("none", True, False),
    ("optimizer", False, False),
    ("optimizer", True, False),
    ("params", False, False),
    ("params", True, False),
    ("optimizer", False, True),
    ("optimizer", True, True),
)


def offload_tiers(s: Strategy, hw: Hardware, unbuilt: bool = False) -> list[Strategy]:
    """`s` with each offload tier its framework runs, cheapest first. For Loom: the tiers
    `loom train` accepts today (loom_refusal), or with `unbuilt` also those it does not run
    yet; PyTorch FSDP offloads all states together (params); Megatron / DeepSpeed run all
    (ZeRO-Offload, ZeRO-Infinity). The NVMe tier only where the node has a disk."""
    out = []
    for offload, activations, nvme in TIERS:
        if nvme and hw.disk_gb <= 0:
            continue
        if s.framework == "pytorch" and offload == "optimizer":
            continue
        moved = replace(
            s,
            offload=offload,
            activation_offload=activations,
            offload_nvme=nvme,
            zero_stage=3 if offload == "params" else s.zero_stage,
        )
        if not (finetune_refusal(moved) or loom_refusal(moved, unbuilt)):
            out.append(moved)
    return out


def _global_batch(spec: PlanSpec) -> int:
    if spec.base.global_batch > 1:
        return spec.base.global_batch
    return 2 ** round(math.log2(DEFAULT_BATCH_TOKENS / spec.model.seq_len))


def _plan(model: ModelShape, hw: Hardware, s: Strategy, memory: Memory, cal: Calibration) -> Plan:
    time = step_time(model, hw, s, cal)
    peak = hw.peak_tflops[s.precision] * 1e12
    result = Plan(s, memory, time, fits(memory, hw), hw.devices, peak, model.seq_len)
    check_physics(result)
    return result


class PhysicsError(AssertionError):
    """A prediction no hardware can realise: a bug in the model, never an answer to print."""


def check_physics(plan: Plan) -> None:
    """Every time and memory term is finite and non-negative, the step takes time, and neither
    the model FLOPs (MFU) nor the FLOPs the hardware executes (with recomputation) run faster
    than the devices' peak."""
    t = plan.time
    terms = {**t.breakdown(), **{f"memory.{k}": v for k, v in plan.memory.gib().items()}}
    bad = {k: v for k, v in terms.items() if not (math.isfinite(v) and v >= 0)}
    if bad or t.total <= 0:
        raise PhysicsError(f"{plan.strategy}: impossible terms {bad or {'total': t.total}}")
    executed = t.hardware_flops / t.total / plan.devices
    if not 0 < plan.mfu <= 1 or executed > plan.peak_flops:
        raise PhysicsError(
            f"{plan.strategy}: MFU {plan.mfu:.3f}, executed {executed / 1e12:.1f} TFLOP/s per "
            f"device against a peak of {plan.peak_flops / 1e12:.1f}"
        )


def nothing_fits(spec: PlanSpec) -> LoomError:
    """Say why no layout fits and what would: more devices of this kind, or offload."""
    model, hw = spec.model, spec.hardware
    batch = _global_batch(spec)
    if not candidates(model, hw, spec.base, batch, spec.fixed):
        raise LoomError(
            f"no layout of {hw.devices} devices splits the global batch of {batch} sequences: "
            "the data-parallel degree must divide it; use a batch with more factors of two "
            "(e.g. a power of two) or another device count"
        )
    if spec.base.framework == "loom" and spec.base.finetune == "qlora":  # one device only
        return LoomError(
            f"QLoRA of {model.params() / 1e9:.1f}B parameters does not fit on one "
            f"{hw.memory_gb:g} GB {hw.name} (loom finetune runs QLoRA in one process); use a "
            "device with more memory, finetune=lora over several devices, or a smaller model"
        )
    for factor in (2, 4, 8, 16, 32, 64, 128, 256):
        bigger = replace(hw, devices=hw.devices * factor)
        if search(replace(spec, hardware=bigger), keep=1):
            return LoomError(
                f"no layout of {model.params() / 1e9:.1f}B parameters fits on {hw.devices} × "
                f"{hw.memory_gb:g} GB {hw.name}; it needs ≥ {bigger.devices} of these devices "
                "(or devices with more memory, or LoRA / QLoRA for fine-tuning)"
            )
    return LoomError(
        f"no layout fits even on {hw.devices * 256} × {hw.memory_gb:g} GB devices; "
        "shorten the sequence or use a smaller model"
    )


def plan(spec: PlanSpec, cal: Calibration = DEFAULT_CALIBRATION) -> tuple[Plan, list[Plan]]:
    """The given strategy's plan, or the best of the search (and the ranked list)."""
    if spec.strategy is not None:
        check_strategy(spec.model, spec.hardware, spec.strategy, spec.unbuilt)
        result = evaluate(spec.model, spec.hardware, spec.strategy, cal)
        return result, [result]
    widest = replace(spec.base, tp=1, pp=1, cp=1, dp=spec.hardware.devices)
    refusal = finetune_refusal(widest)
    if refusal:
        raise LoomError(refusal)
    ranked = search(spec, cal)
    if not ranked:
        raise nothing_fits(spec)  # raises itself when the batch is the problem
    return ranked[0], ranked
