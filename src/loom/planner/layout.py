"""A plan as the config keys that run it: `loom plan` prints the `loom train` (or `loom
finetune`) overrides of its answer, so the layout it recommends is one the trainer accepts."""

from __future__ import annotations

import math

from loom.planner.collectives import pipeline_microbatches
from loom.planner.memory import GB, Memory
from loom.planner.spec import ModelShape, Strategy

OFFLOAD_DIR = "loom-offload"  # relative to where the run starts: start it on the NVMe drives


def config_overrides(
    model: ModelShape, s: Strategy, memory: Memory | None = None, offload_dir: str = OFFLOAD_DIR
) -> dict[str, str]:
    """The train, parallel, memory (and for adapters finetune and lora) keys of layout `s`, as
    `--key=value` overrides take them. The NVMe tier's host budget is the host memory the plan
    counted per device (`memory`), so the run keeps the window the plan assumed."""
    chunks = pipeline_microbatches(s)
    fsdp = s.zero_stage >= 3 or s.offload == "params"
    dp_shard = (s.dp_shard or s.dp) if fsdp else 1
    out = {
        "train.seq_len": model.seq_len,
        "train.batch_size": s.global_batch,
        "train.micro_batch_size": s.micro_batch * s.dp * chunks,
        "train.precision": "fp32" if s.precision == "fp32" else "bf16",
        "train.float8": s.precision == "fp8",
        "parallel.tp": s.tp,
        "parallel.pp": s.pp,
        "parallel.dp_shard": dp_shard,
        "parallel.dp_replicate": s.dp // dp_shard,
        "parallel.sequence_parallel": s.sp or s.tp == 1,
        "memory.recompute": s.recompute,
        "memory.offload": s.offload,
        "memory.activation_offload": s.activation_offload,
    }
    if s.ep > 1:
        out["parallel.ep"] = s.ep
    if s.cp > 1:
        out["parallel.cp"] = s.cp
    if s.offload_nvme:
        out["memory.offload_dir"] = offload_dir
        if memory is not None:
            out["memory.host_budget_gb"] = math.ceil(memory.host / GB)
    if s.pp > 1:
        out["parallel.schedule"] = s.schedule
        out["parallel.stages_per_rank"] = s.virtual_stages
        out["parallel.microbatches"] = chunks
        stages = s.pp * s.virtual_stages
        if model.layers % stages:  # the planner's uneven split (rank_layers), as Loom takes it
            bounds = [model.layers * i // stages for i in range(1, stages)]
            out["parallel.split_points"] = ",".join(map(str, bounds))
    if s.finetune != "full":
        out["finetune.method"] = s.finetune
        out["lora.rank"] = s.lora_rank
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in out.items()}


def command_line(model: ModelShape, s: Strategy, memory: Memory | None = None) -> str:
    """The command that runs layout `s`: `loom finetune` for adapters, else `loom train`, with
    torchrun's process count where the layout needs a process group (FSDP's offload does even
    on one device)."""
    command = "loom finetune" if s.finetune != "full" else "loom train"
    words = [command, "CONFIG"]
    if s.devices > 1 or s.offload == "params":
        words.append(f"--nproc {s.devices}")
    words += [f"--{k}={v}" for k, v in config_overrides(model, s, memory).items()]
    return " ".join(words)
