"""AdamW with decoupled weight decay on matrices only, and warm-up + cosine learning rate."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from loom.core import distributed
from loom.core.config import MemoryConfig, OptimizerConfig
from loom.train.offload import OffloadAdamW


def build_optimizer(
    model: nn.Module,
    cfg: OptimizerConfig,
    memory: MemoryConfig | None = None,
    name: str = "part0",
) -> torch.optim.Optimizer:
    """Weight decay on matrices (and embeddings); none on norms and biases.

    Uses torch's fused kernel, on accelerators and on CPU (there 6-8x faster than the
    multi-tensor one: BENCHMARKS.md, memory tiers); with
    `memory.offload=optimizer`, AdamW with its state in host memory (or, with
    `memory.offload_dir`, in files there under `name`) that steps on the CPU.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # One group per weight decay and device mesh: the multi-tensor kernels take the DTensors of
    # one mesh at a time (expert-parallel experts live on another mesh than FSDP's shards).
    by_key: dict[tuple[bool, object], list[nn.Parameter]] = {}
    for p in params:
        mesh = p.device_mesh if isinstance(p, DTensor) else None
        by_key.setdefault((p.ndim >= 2, mesh), []).append(p)
    # Only non-empty groups: an empty one (LoRA trains matrices only) breaks checkpointing.
    groups = [
        {"params": group, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (decay, _), group in sorted(by_key.items(), key=lambda item: not item[0][0])
    ]
    if memory is not None and memory.offload == "optimizer":
        return OffloadAdamW(
            groups,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            directory=Path(memory.offload_dir) / name if memory.offload_dir else None,
            budget_bytes=int(memory.host_budget_gb * 1e9),
        )
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=True,
    )
    optimizer.register_load_state_dict_pre_hook(_keep_kernel_choice)
    return optimizer


def _keep_kernel_choice(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> None:
    """Which AdamW kernel runs (fused, foreach) is this process's choice, not the checkpoint's:
    a checkpoint saved on another device, or with `memory.offload=optimizer`, names another."""
    for group, saved in zip(optimizer.param_groups, state_dict["param_groups"], strict=False):
        saved.update(fused=group["fused"], foreach=group["foreach"])


def lr_multiplier(step: int, cfg: OptimizerConfig, total_steps: int) -> float:
    """Factor on the peak lr after `step` optimizer steps: linear warm-up, then cosine decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    horizon = max(1, (cfg.decay_steps or total_steps) - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / horizon)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimizerConfig, total_steps: int
) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, total_steps))


def apply_optimizer_config(
    optimizer: torch.optim.Optimizer, scheduler: LambdaLR, cfg: OptimizerConfig
) -> None:
    """After loading a checkpoint: the config's hyper-parameters win over the saved ones.

    The saved param groups carry the old lr, betas, eps and weight decay; resuming with a new
    config (a lower lr, a longer schedule) must train with the new values from the next step
    on. The schedule is re-evaluated at the saved step with the current lambda.
    """
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    multiplier = scheduler.lr_lambdas[0](scheduler.last_epoch)
    for group in optimizer.param_groups:
        group.update(
            lr=cfg.lr * multiplier,
            initial_lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay if group["params"][0].ndim >= 2 else 0.0,
        )


class Optimizers:
    """One AdamW and one schedule per model part (a rank may hold several pipeline stages),
    stepped together; the schedules stay in lockstep, so one state describes them all."""

    def __init__(
        self,
        parts: list[nn.Module],
        cfg: OptimizerConfig,
        total_steps: int,
        memory: MemoryConfig | None = None,
    ) -> None:
        if memory is not None and memory.host_budget_gb and len(parts) > 1:
            # The budget is the process's: each part's window gets its share.
            share = memory.host_budget_gb / len(parts)
            memory = dataclasses.replace(memory, host_budget_gb=share)
        rank = distributed.rank()
        self.optimizers = [
            build_optimizer(part, cfg, memory, f"rank{rank}-part{i}")
            for i, part in enumerate(parts)
        ]
        self.schedulers = [build_scheduler(o, cfg, total_steps) for o in self.optimizers]

    @property
    def lr(self) -> float:
        return float(self.optimizers[0].param_groups[0]["lr"])

    def step(self) -> None:
        for optimizer, scheduler in zip(self.optimizers, self.schedulers, strict=True):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

    def zero_grad(self) -> None:
        """Drop the gradients without stepping (a skipped step)."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def scheduler_state(self) -> dict[str, object]:
        return self.schedulers[0].state_dict()

    def resume(self, scheduler_state: dict[str, object], cfg: OptimizerConfig) -> None:
        """Continue the saved schedule with the config's current hyper-parameters."""
        for optimizer, scheduler in zip(self.optimizers, self.schedulers, strict=True):
            scheduler.load_state_dict(scheduler_state)
            apply_optimizer_config(optimizer, scheduler, cfg)
