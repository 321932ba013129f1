"""The planner's memory and communication against Loom's real code, simulated at scale.

For each layout, `loom train --simulate` runs one optimizer step of rank 0 on fake tensors
and a fake process group (the real model, the real parallel layout, the trainer's step) and
reports its peak memory by category and the bytes of every collective; the planner predicts
the same for the same config. The planner's `other` without its CUDA-context allowance and
fragmentation (which fake tensors cannot see) is compared, so both count tensors only.

    python benchmarks/simulate_vs_planner.py   # writes simulate_vs_planner
"""

from __future__ import annotations

import sys
import time

from report import write_section  # benchmarks/ is on the path when a script in it runs

from loom.config import Config, load_config
from loom.errors import LoomError
from loom.train.simulate import GIB, planner_prediction, simulate

KEYS = ("params", "grads", "optimizer", "activations", "other", "total")

# (name, world size, overrides): Llama-3 presets at 8,192 tokens, one sequence per rank.
LAYOUTS: list[tuple[str, int, list[str]]] = [
    ("8B FSDP", 8, ["parallel.dp_shard=8"]),
    ("8B FSDP, accumulate 2", 8, ["parallel.dp_shard=8", "train.batch_size=16"]),
    ("8B FSDP selective", 8, ["parallel.dp_shard=8", "memory.recompute=selective"]),
    ("8B TP2+SP × FSDP4", 8, ["parallel.tp=2", "parallel.dp_shard=4"]),
    ("8B TP4+SP × FSDP4 full", 16, ["parallel.tp=4", "parallel.dp_shard=4", "full"]),
    ("8B FSDP offload", 8, ["parallel.dp_shard=8", "memory.offload=params", "full"]),
    ("8B float8 FSDP", 8, ["parallel.dp_shard=8", "train.float8=true", "full"]),
    ("8B HSDP 8 × 8", 64, ["parallel.dp_replicate=8", "parallel.dp_shard=8", "full"]),
    ("70B TP8 × FSDP8 full", 64, ["parallel.tp=8", "parallel.dp_shard=8", "full"]),
    ("70B TP8 × FSDP32 selective", 256, ["parallel.tp=8", "parallel.dp_shard=32", "sel"]),
    ("70B FSDP128 full", 128, ["parallel.dp_shard=128", "full"]),
    ("70B HSDP 4 × 32 × TP8", 1024, ["parallel.dp_replicate=4", "parallel.tp=8", "full"]),
    ("405B TP8 × FSDP128 full", 1024, ["parallel.tp=8", "parallel.dp_shard=128", "full"]),
    ("405B HSDP 16 × 128 × TP8", 16384, ["parallel.dp_replicate=16", "parallel.tp=8", "full"]),
]
SHORT = {"full": "memory.recompute=full", "sel": "memory.recompute=selective"}
PRESET = {"8B": "llama3-8b", "70B": "llama3-70b", "405B": "llama3-405b"}


def layout_config(name: str, world: int, overrides: list[str]) -> Config:
    """A preset at 8,192 tokens in bf16 with one sequence per data-parallel rank per step."""
    args = [f"--{SHORT.get(o, o)}" for o in overrides]
    dp = world // _degree(overrides, "tp") // _degree(overrides, "pp")
    batch = next((int(o.split("=")[1]) for o in overrides if "batch_size" in o), dp)
    base = [
        f"--model.preset={PRESET[name.split()[0]]}",
        "--model.tie_embeddings=false",
        "--train.seq_len=8192",
        "--train.precision=bf16",
        "--train.device=cpu",
        f"--train.batch_size={batch}",
        f"--train.micro_batch_size={dp}",
    ]
    return load_config(None, [*base, *(a for a in args if "batch_size" not in a)])


def _degree(overrides: list[str], name: str) -> int:
    return next((int(o.split("=")[1]) for o in overrides if o.startswith(f"parallel.{name}=")), 1)


def error(predicted: float, simulated: float) -> float:
    return (predicted - simulated) / simulated if simulated else 0.0


def main() -> None:
    rows, comm_rows, misses = [], [], []
    for name, world, overrides in LAYOUTS:
        cfg = layout_config(name, world, overrides)
        start = time.perf_counter()
        try:
            sim = simulate(cfg, world)
        except LoomError as e:
            rows.append(f"| {name} | {world} | not simulated: {e} |" + " |" * 6)
            continue
        seconds = time.perf_counter() - start
        memory, predicted = planner_prediction(cfg, world)
        err = error(memory["total"], sim.memory_gib["total"])
        cells = " | ".join(f"{memory[k]:.2f} / {sim.memory_gib[k]:.2f}" for k in KEYS)
        rows.append(f"| {name} | {world} | {cells} | {err:+.1%} | {seconds:.0f} s |")
        sim_bytes = sum(c.bytes for c in sim.collectives)
        plan_bytes = sum(c.bytes for c in predicted)
        comm_err = error(plan_bytes, sim_bytes)
        kinds = ", ".join(
            f"{c.kind} {c.group} ×{c.count}" for c in sim.collectives if c.bytes >= 2**20
        )
        comm_rows.append(
            f"| {name} | {plan_bytes / GIB:.2f} | {sim_bytes / GIB:.2f} | {comm_err:+.1%} "
            f"| {kinds} |"
        )
        if abs(err) > 0.10 or abs(comm_err) > 0.10:
            misses.append(name)
        print(rows[-1], comm_rows[-1], sep="\n", flush=True)
    head = " | ".join(KEYS)
    body = [
        "Rank 0 of each job, one optimizer step (the second: AdamW's state exists), Llama-3 "
        "presets at 8,192 tokens, bf16, one sequence per data-parallel rank. Memory cells: "
        "planner / simulated GiB; the planner's `other` without its CUDA-context allowance "
        "and allocator fragmentation (fake tensors see neither).",
        "",
        f"| layout | ranks | {head} | total error | simulated in |",
        "|---|---|" + "---|" * (len(KEYS) + 2),
        *rows,
        "",
        "Communication per step on rank 0 (summed unsharded bytes of every call, GiB):",
        "",
        "| layout | planner | simulated | error | collectives over 1 MiB (simulated) |",
        "|---|---|---|---|---|",
        *comm_rows,
        "",
        f"Beyond 10%: {', '.join(misses) if misses else 'none'}. Pipeline layouts are not "
        "simulated (see `loom train --simulate` with parallel.pp > 1).",
    ]
    write_section("simulate_vs_planner", "\n".join(body))


if __name__ == "__main__":
    sys.exit(main())
