"""The planner in front of `loom train`: predicted memory before a run, and `parallel.auto`."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import torch

from loom.core.config import Config
from loom.core.device import process_memory_bytes
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.parallel.dims import ParallelDims, resolve
from loom.planner.memory import GB, Memory, estimate, refusal
from loom.planner.search import candidates, evaluate
from loom.planner.spec import Hardware, Strategy, model_from_config

SCHEDULES = {"GPipe": "GPipe", "1F1B": "1F1B", "Interleaved1F1B": "Interleaved1F1B"}


def local_hardware(device: torch.device, world: int) -> Hardware:
    """This machine as the planner sees it: device memory (host RAM on a CPU)."""
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / max(1, world)
    return Hardware(
        name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        peak_tflops={"bf16": 1.0, "fp32": 1.0, "fp8": 1.0},
        memory_gb=memory / GB,
        devices=world,
        devices_per_node=max(world, 1),
        host_memory_gb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB,
        # On a CPU: this process as it stands before its model is built, and one RAM.
        **({} if device.type == "cuda" else _cpu_device()),
    )


def _cpu_device() -> dict[str, Any]:
    return {"runtime_gb": process_memory_bytes(peak=False) / GB, "host_device": True}


def strategy_for(cfg: Config, dims: ParallelDims) -> Strategy:
    t, p = cfg.train, cfg.parallel
    micro = t.micro_batch_size or t.batch_size
    fsdp = dims.dp_shard > 1 or cfg.memory.offload == "params"
    return Strategy(
        tp=dims.tp,
        pp=dims.pp,
        dp=dims.dp,
        sp=dims.tp > 1 and p.sequence_parallel,
        zero_stage=3 if fsdp else 0,
        dp_shard=dims.dp_shard if fsdp else 0,  # HSDP: replicas of dp_shard-way shards
        recompute=cfg.memory.recompute,
        micro_batch=max(1, micro // dims.dp // dims.microbatches),
        global_batch=t.batch_size,
        virtual_stages=dims.stages_per_rank,
        schedule=SCHEDULES.get(p.schedule, "ZeroBubble"),
        offload=cfg.memory.offload,
        offload_nvme=bool(cfg.memory.offload_dir),
        activation_offload=cfg.memory.activation_offload,
        precision=t.precision,
        framework="loom",
        ep=dims.ep,
        cp=dims.cp,
    )


def predicted_memory(cfg: Config, dims: ParallelDims, hw: Hardware, **strategy: object) -> Memory:
    """`strategy`: Strategy fields the config does not decide (fine-tuning: `finetune`,
    `lora_rank`)."""
    model = model_from_config(cfg.model, cfg.train.seq_len)
    return estimate(model, hw, replace(strategy_for(cfg, dims), **strategy))


def check_fits(
    cfg: Config, dims: ParallelDims, device: torch.device, force: bool, **strategy: object
) -> None:
    """Log the predicted peak; refuse a layout predicted not to fit (unless `force`)."""
    hw = local_hardware(device, dims.world_size)
    memory = predicted_memory(cfg, dims, hw, **strategy)
    gib = memory.gib()
    logger.info(
        "predicted peak memory per device: %.2f GiB (params %.2f, grads %.2f, optimizer %.2f, "
        "activations %.2f, other %.2f) of %.1f GiB",
        gib["total"],
        gib["params"],
        gib["grads"],
        gib["optimizer"],
        gib["activations"],
        gib["other"],
        hw.memory_gb * GB / 2**30,
    )
    # On a GPU, the host tier must hold what the layout offloads (on a CPU the two are one
    # memory, counted once as the device's; the disk's size is the offload_dir's business).
    over = refusal(replace(memory, disk=0.0), hw) if device.type == "cuda" else None
    if over and memory.total <= hw.memory_gb * GB and not force:
        raise LoomError(f"this layout {over}; see `loom plan`, or set train.force=true")
    if memory.total <= hw.memory_gb * GB or force:
        return
    advice = []
    for option, overrides in (
        ("memory.recompute=full", {"recompute": "full"}),
        ("memory.offload=params", {"offload": "params", "zero_stage": 3}),
    ):
        trial = replace(strategy_for(cfg, dims), **strategy, **overrides)
        if (
            estimate(model_from_config(cfg.model, cfg.train.seq_len), hw, trial).total
            <= hw.memory_gb * GB
        ):
            advice.append(option)
    fix = f"try {' or '.join(advice)}" if advice else "use more devices or a smaller model"
    raise LoomError(
        f"this layout is predicted to need {gib['total']:.1f} GiB per device but the device "
        f"has {hw.memory_gb * GB / 2**30:.1f} GiB; {fix} (see `loom plan`), or set "
        "train.force=true to start anyway"
    )


def auto_layout(cfg: Config, world: int, device: torch.device) -> Config:
    """`parallel.auto`: the fastest layout the planner finds for `world` processes that Loom
    can run (DDP or FSDP, TP within the KV heads, 1F1B or interleaved pipelines)."""
    hw = local_hardware(device, world)
    hw = replace(hw, peak_tflops={"bf16": 100.0, "fp32": 50.0, "fp8": 100.0})
    model = model_from_config(cfg.model, cfg.train.seq_len)
    base = strategy_for(cfg, resolve(cfg, world) if _plain_fits(cfg, world) else _single(world))
    ranked = []
    for s in candidates(model, hw, base, cfg.train.batch_size):
        if s.zero_stage not in (0, 3) or cfg.model.n_kv_heads % s.tp or s.schedule == "ZeroBubble":
            continue
        plan = evaluate(model, hw, s)
        if plan.fits:
            ranked.append(plan)
    ranked.sort(key=lambda p: -p.tokens_per_s)
    for plan in ranked:
        s = plan.strategy
        parallel = replace(
            cfg.parallel,
            tp=s.tp,
            pp=s.pp,
            dp_replicate=s.dp if s.zero_stage == 0 else 1,
            dp_shard=1 if s.zero_stage == 0 else s.dp,
            schedule="Interleaved1F1B" if s.virtual_stages > 1 else "1F1B",
            stages_per_rank=s.virtual_stages,
            microbatches=0,
            auto=False,
        )
        chosen = replace(cfg, parallel=parallel, memory=replace(cfg.memory, recompute=s.recompute))
        try:
            resolve(chosen, world)
        except LoomError:
            continue
        logger.info(
            "parallel.auto chose tp %d, pp %d, dp %d (%s), %s recompute",
            s.tp,
            s.pp,
            s.dp,
            "FSDP" if s.zero_stage else "DDP",
            s.recompute,
        )
        return chosen
    raise LoomError(f"parallel.auto found no layout of {world} processes that fits this model")


def _plain_fits(cfg: Config, world: int) -> bool:
    try:
        resolve(cfg, world)
    except LoomError:
        return False
    return True


def _single(world: int) -> ParallelDims:
    return ParallelDims(
        pp=1, dp_replicate=1, dp_shard=world, tp=1, stages_per_rank=1, microbatches=1
    )
