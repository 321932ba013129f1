"""The planner's verdict for a training stage, made before anything runs: on this machine as
`loom train` consults it, or on the stage's `[hardware]` as `loom plan` would answer."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from loom.core.config import Config
from loom.core.device import select_device
from loom.core.errors import LoomError
from loom.parallel.dims import resolve
from loom.pipeline.stage import BaseStage
from loom.pipeline.stages.training import HardwareSection, TrainingStage
from loom.planner.calibrate import this_machine
from loom.planner.hardware import peak_flops
from loom.planner.report import summary
from loom.planner.search import evaluate
from loom.planner.spec import Hardware, check_strategy, model_from_config
from loom.planner.training import auto_layout, check_fits, local_hardware, strategy_for
from loom.report import human_duration


def predict(stage: TrainingStage, earlier: list[BaseStage]) -> dict[str, Any]:
    """check_fits raises its message when the layout does not fit; else the `loom plan --json`
    summary with what the stage trains and where."""
    cfg, extra = stage.training_config(earlier), stage.planner_extra()
    if stage.hardware is not None:
        return _predict_on(stage.name, stage.hardware, cfg, extra)
    device = select_device(cfg.train.device)
    world = stage.launch.nproc * stage.launch.nnodes
    if cfg.parallel.auto:
        cfg = auto_layout(cfg, world, device)
    try:
        dims = resolve(cfg, world)
        check_fits(cfg, dims, device, force=cfg.train.force, **extra)
    except LoomError as e:
        where = f" on {world} processes ([{stage.name}.launch] nproc)" if world > 1 else ""
        raise LoomError(f"[{stage.name}]{where} {e}") from None
    strategy = dataclasses.replace(strategy_for(cfg, dims), **extra)
    hw, source = _this_hardware(cfg, device, world, strategy.micro_batch)
    plan = evaluate(model_from_config(cfg.model, cfg.train.seq_len), hw, strategy)
    name = f"{hw.name} ({source})" if device.type == "cpu" else hw.name
    out = _figures(summary(plan, _tokens(cfg)), cfg, world)
    out["device"] = f"{world} processes × {name}" if world > 1 else name
    out["device_memory_gib"] = round(hw.memory_gb * 1e9 / 2**30, 3)
    return out


def _this_hardware(
    cfg: Config, device: torch.device, world: int, micro_batch: int
) -> tuple[Hardware, str]:
    """This machine as the planner sees it, and where its peak comes from."""
    hw = local_hardware(device, world)
    if device.type == "cpu":
        # A CPU's step is not a GPU's: its memory bandwidth, attention kernel and thin-matmul
        # efficiency are measured (`loom plan --calibrate`'s profile, measured once if absent).
        m = cfg.model
        shape = (micro_batch, m.n_heads, m.n_kv_heads, cfg.train.seq_len, m.attn_head_dim)
        measured = this_machine(world, True, shape)
        return dataclasses.replace(measured, memory_gb=hw.memory_gb), "measured profile"
    flops, source = peak_flops(device, cfg.train.precision)
    tflops = flops / 1e12 if flops else 1.0
    peak = {"bf16": tflops, "fp32": tflops, "fp8": tflops}
    return dataclasses.replace(hw, peak_tflops=peak), source


def _predict_on(
    name: str, target: HardwareSection, cfg: Config, extra: dict[str, object]
) -> dict[str, Any]:
    """The prediction for `[NAME.hardware]`: its GPUs (the planner's table, as `loom plan`
    reads it) and the stage's `[parallel]` layout resolved against its GPU count."""
    where = f"[{name}.hardware] ({target.words()})"
    if cfg.parallel.auto:
        raise LoomError(
            f"[{name}] parallel.auto picks a layout for the machine it runs on; with {where} "
            f"set [{name}.parallel] tp / pp / dp_shard yourself (`loom plan --gpu "
            f"{target.gpu} --gpus {target.gpus} --model ...` suggests one)"
        )
    hw = target.planner(name)
    try:
        dims = resolve(cfg, target.gpus)
        model = model_from_config(cfg.model, cfg.train.seq_len)
        strategy = dataclasses.replace(strategy_for(cfg, dims), **extra)
        check_strategy(model, hw, strategy)
    except LoomError as e:
        raise LoomError(f"[{name}] on {where}: {e}") from None
    plan = evaluate(model, hw, strategy)
    need, have = plan.memory.gib()["total"], hw.memory_gb * 1e9 / 2**30
    if not plan.fits and not cfg.train.force:
        raise LoomError(
            f"[{name}] on {where} this layout is predicted to need {need:.1f} GiB per device "
            f"but the device has {have:.1f} GiB; shard more ([{name}.parallel] dp_shard / tp), "
            f'set [{name}.memory] recompute = "full", or add GPUs (see `loom plan`), or set '
            "train.force=true to start anyway"
        )
    out = _figures(summary(plan, _tokens(cfg)), cfg, target.gpus)
    out["nodes"] = target.nodes
    known = "" if hw.name == target.gpu.lower() else f", {hw.name} in the planner's table"
    out["device"] = f"{target.words()}{known}, from [{name}.hardware]"
    out["device_memory_gib"] = round(have, 3)
    out["hardware"] = dataclasses.asdict(target) | {"planner_gpu": hw.name}
    return out


def _tokens(cfg: Config) -> int:
    return cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len


def _figures(out: dict[str, Any], cfg: Config, devices: int) -> dict[str, Any]:
    """The summary plus what is trained on how many devices."""
    out["model_params"] = cfg.model.num_params()
    out["devices"] = devices
    out["steps"] = cfg.train.steps
    out["training_tokens"] = _tokens(cfg)
    return out


def describe_plan(name: str, plan: dict[str, Any]) -> str:
    """One line per training stage for `loom run`'s preamble."""
    seconds = plan["train_days"] * 86400 if plan.get("train_days") else None
    took = "" if seconds is None else f", {plan['steps']} steps ≈ {human_duration(seconds)}"
    if seconds is not None and "hardware" in plan:
        took += f" ({plan['train_days']:.2f} days) for {plan['training_tokens'] / 1e9:.3g}B tokens"
    layout = ""
    if "hardware" in plan:
        s = plan["strategy"]
        layout = (
            f"; layout tp {s['tp']} × pp {s['pp']} × dp {s['dp']}"
            f"{' (FSDP)' if s['zero_stage'] == 3 else ''}, {s['recompute']} recompute"
        )
    return (
        f"{name}: {plan['model_params'] / 1e6:.2f}M parameters; predicted peak memory "
        f"{plan['memory_gib']['total']:.2f} GiB per device of {plan['device_memory_gib']:.1f} GiB "
        f"({plan['device']}){layout}; {plan['tokens_per_s']:,.0f} tokens/s{took}"
    )
