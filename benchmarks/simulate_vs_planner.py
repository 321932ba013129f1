"""The planner's memory and communication against Loom's real code, simulated at scale.

For each layout, `loom train --simulate` runs one optimizer step of rank 0 on fake tensors
and a fake process group (the real model, the real parallel layout, the trainer's step) and
reports its peak memory by category and the bytes of every collective; the planner predicts
the same for the same config. The planner's `other` without its CUDA-context allowance and
fragmentation (which fake tensors cannot see) is compared, so both count tensors only.

    python benchmarks/simulate_vs_planner.py        # all layouts; writes simulate_vs_planner
    python benchmarks/simulate_vs_planner.py 405B   # the layouts whose name has "405B"; prints
    python benchmarks/simulate_vs_planner.py --reuse  # the planner against the simulations
                                                    # saved by the last full run (minutes less)

A full run saves the simulated memory and collectives in `/tmp/simulate_vs_planner.json`
(--reuse reads them: for iterating on the planner, not on the simulated code).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from report import write_section  # benchmarks/ is on the path when a script in it runs

from loom.core.config import Config, load_config
from loom.core.errors import LoomError
from loom.planner.collectives import Collective
from loom.train.simulate import GIB, planner_prediction, simulate

SAVED = Path("/tmp/simulate_vs_planner.json")

KEYS = ("params", "grads", "optimizer", "activations", "other", "total")

# (name, world size, overrides, blocks simulated): Llama-3 widths at 8,192 tokens (or `seq=`),
# bf16. Fake
# tensors cost a step's operations, not its bytes, so each model keeps its real widths with
# fewer blocks (enough for one block or more per pipeline stage); the planner is asked about
# the same reduced model, so the two sides compare like with like.
LAYOUTS: list[tuple[str, int, list[str], int]] = [
    ("8B FSDP", 8, ["parallel.dp_shard=8"], 32),
    ("8B FSDP, accumulate 2", 8, ["parallel.dp_shard=8", "batch=16"], 32),
    ("8B FSDP selective", 8, ["parallel.dp_shard=8", "sel"], 32),
    ("8B TP2+SP × FSDP4", 8, ["parallel.tp=2", "parallel.dp_shard=4"], 32),
    ("8B TP4+SP × FSDP4 full", 16, ["parallel.tp=4", "parallel.dp_shard=4", "full"], 32),
    ("8B FSDP offload", 8, ["parallel.dp_shard=8", "memory.offload=params", "full"], 32),
    ("8B HSDP 8 × 8", 64, ["parallel.dp_replicate=8", "parallel.dp_shard=8", "full"], 32),
    ("8B PP2 1F1B × FSDP4", 8, ["parallel.pp=2", "parallel.dp_shard=4"], 32),
    ("70B TP8 × FSDP8 full", 64, ["parallel.tp=8", "parallel.dp_shard=8", "full"], 16),
    ("70B TP8 × PP4 1F1B × FSDP8 full", 256, ["parallel.tp=8", "parallel.pp=4", "full"], 16),
    (
        "70B TP8 × PP4 interleaved v2 × FSDP4",
        128,
        ["parallel.tp=8", "parallel.pp=4", "parallel.schedule=Interleaved1F1B", "full"],
        16,
    ),
    ("70B HSDP 4 × 32 × TP8", 1024, ["parallel.dp_replicate=4", "parallel.tp=8", "full"], 16),
    ("405B TP8 × FSDP128 full", 1024, ["parallel.tp=8", "parallel.dp_shard=128", "full"], 16),
    ("405B TP8 × PP16 × FSDP128", 16384, ["parallel.tp=8", "parallel.pp=16", "full"], 16),
    ("405B HSDP 16 × 128 × TP8", 16384, ["parallel.dp_replicate=16", "parallel.tp=8", "full"], 16),
    ("8B CP4 × FSDP2 full, 32K", 8, ["parallel.cp=4", "full", "seq=32768"], 32),
    ("70B CP8 × FSDP16 full, 128K", 128, ["parallel.cp=8", "full", "seq=131072"], 16),
    (
        "8B CP2 × TP2+SP × PP2 × FSDP2 full, 32K",
        16,
        ["parallel.cp=2", "parallel.tp=2", "parallel.pp=2", "full", "seq=32768"],
        32,
    ),
    # Mixtral-8x7B widths (8 experts, top 2), routed as if balanced (capacity factor 1.0)
    ("Mixtral FSDP8 full", 8, ["full"], 4),
    ("Mixtral EP8 × FSDP8 full", 8, ["parallel.ep=8", "full"], 4),
    ("Mixtral TP2+SP × EP4 × FSDP4 full", 8, ["parallel.tp=2", "parallel.ep=4", "full"], 4),
]
SHORT = {"full": "memory.recompute=full", "sel": "memory.recompute=selective"}
PRESET = {"8B": "llama3-8b", "70B": "llama3-70b", "405B": "llama3-405b", "Mixtral": "mixtral-8x7b"}


def layout_config(name: str, world: int, overrides: list[str], layers: int) -> Config:
    """A preset's widths with `layers` blocks at 8,192 tokens (or `seq=`) in bf16, one sequence per
    data-parallel rank per pipeline micro-batch (one per stage, Loom's default), accumulation
    where a `batch=` override asks for more sequences."""
    args = [f"--{SHORT.get(o, o)}" for o in overrides if not o.startswith(("batch=", "seq="))]
    pp = _degree(overrides, "pp")
    dp = world // _degree(overrides, "tp") // pp // _degree(overrides, "cp")
    seq = next((int(o.split("=")[1]) for o in overrides if o.startswith("seq=")), 8192)
    stages = pp * (2 if "Interleaved" in " ".join(overrides) else 1) if pp > 1 else 1
    micro = dp * stages
    batch = next((int(o.split("=")[1]) for o in overrides if o.startswith("batch=")), micro)
    base = [
        f"--model.preset={PRESET[name.split()[0]]}",
        f"--model.n_layers={layers}",
        "--model.tie_embeddings=false",
        f"--train.seq_len={seq}",
        "--train.precision=bf16",
        "--train.device=cpu",
        f"--train.batch_size={batch}",
        f"--train.micro_batch_size={micro}",
    ]
    longer = [f"--model.max_seq_len={seq}"] if seq > 8192 else []
    return load_config(None, [*base, *longer, *args])


def _degree(overrides: list[str], name: str) -> int:
    return next((int(o.split("=")[1]) for o in overrides if o.startswith(f"parallel.{name}=")), 1)


def error(predicted: float, simulated: float) -> float:
    return (predicted - simulated) / simulated if simulated else 0.0


def simulated(cfg: Config, world: int) -> dict[str, object]:
    """One simulated step: its memory (GiB), collectives and how long it took."""
    start = time.perf_counter()
    sim = simulate(cfg, world)
    return {
        "memory_gib": sim.memory_gib,
        "collectives": [asdict(c) for c in sim.collectives],
        "seconds": time.perf_counter() - start,
    }


# FSDP shapes that were not looked at when the planner's backward moments were modelled (those
# came from 2-block runs of the 8B, 8B TP2, 8B CP4, 70B TP8 and 405B TP8 shapes of LAYOUTS).
QWEN_7B_4_BLOCKS = [
    "--model.preset=llama3-8b",
    "--model.dim=3584",
    "--model.n_heads=28",
    "--model.n_kv_heads=4",
    "--model.ffn_hidden=18944",
    "--model.vocab_size=152064",
    "--model.n_layers=4",
]
HELD_OUT: list[tuple[str, int, list[str]]] = [
    (
        "Qwen2.5-7B widths, 4 blocks, TP4 × FSDP4, full, 8K",
        16,
        [
            *QWEN_7B_4_BLOCKS,
            "--parallel.tp=4",
            "--memory.recompute=full",
            "--train.seq_len=8192",
        ],
    ),
    (
        "Llama-3.2-1B widths, 16 blocks, TP2 × FSDP4, no recompute, 4K",
        8,
        ["--model.preset=llama3.2-1b", "--parallel.tp=2", "--train.seq_len=4096"],
    ),
    (
        "Llama-3 70B widths, 8 blocks, TP4 × FSDP8, selective, 4K",
        32,
        [
            "--model.preset=llama3-70b",
            "--model.n_layers=8",
            "--parallel.tp=4",
            "--memory.recompute=selective",
            "--train.seq_len=4096",
        ],
    ),
    (
        "Llama-3.2-1B widths, 16 blocks, CP2 × FSDP4, selective, 64K",
        8,
        [
            "--model.preset=llama3.2-1b",
            "--parallel.cp=2",
            "--memory.recompute=selective",
            "--model.max_seq_len=65536",
            "--train.seq_len=65536",
        ],
    ),
    (
        "Qwen2.5-7B widths, 4 blocks, FSDP8, no recompute, 4K",
        8,
        [
            *QWEN_7B_4_BLOCKS,
            "--train.seq_len=4096",
        ],
    ),
]


def held_out() -> None:
    """Peak memory, planner against simulation, on the HELD_OUT shapes (bf16, untied, one
    sequence per data-parallel rank)."""
    rows = []
    for name, world, overrides in HELD_OUT:
        plain = [o.lstrip("-") for o in overrides]
        dp = world // _degree(plain, "tp") // _degree(plain, "cp")
        fixed = ["--model.tie_embeddings=false", "--train.precision=bf16", "--train.device=cpu"]
        batch = [f"--train.batch_size={dp}", f"--train.micro_batch_size={dp}"]
        cfg = load_config(None, [*overrides, *fixed, *batch])
        memory, _ = planner_prediction(cfg, world)
        sim = simulated(cfg, world)["memory_gib"]
        err = error(memory["total"], sim["total"])
        rows.append(
            f"| {name} | {world} | {memory['total']:.2f} | {sim['total']:.2f} | {err:+.1%} |"
        )
        print(rows[-1], flush=True)
    body = [
        "| layout (rank 0) | ranks | planner GiB | simulated GiB | error |",
        "|---|---|---|---|---|",
        *rows,
    ]
    write_section("simulate_held_out", "\n".join(body))


def main(args: list[str]) -> None:
    if "--held-out" in args:
        return held_out()
    reuse = "--reuse" in args
    only = [a for a in args if a != "--reuse"]
    saved = json.loads(SAVED.read_text()) if reuse else {}
    rows, comm_rows, misses = [], [], []
    for name, world, overrides, layers in LAYOUTS:
        if only and not any(word in name for word in only):
            continue
        cfg = layout_config(name, world, overrides, layers)
        if name not in saved:
            try:
                saved[name] = simulated(cfg, world)
                SAVED.write_text(json.dumps(saved))
            except LoomError as e:
                rows.append(f"| {name} | {world} | {layers} | not simulated: {e} |" + " |" * 6)
                continue
        sim_memory = saved[name]["memory_gib"]
        sim_collectives = [Collective(**c) for c in saved[name]["collectives"]]
        memory, predicted = planner_prediction(cfg, world)
        err = error(memory["total"], sim_memory["total"])
        cells = " | ".join(f"{memory[k]:.2f} / {sim_memory[k]:.2f}" for k in KEYS)
        seconds = saved[name]["seconds"]
        rows.append(f"| {name} | {world} | {layers} | {cells} | {err:+.1%} | {seconds:.0f} s |")
        sim_bytes = sum(c.bytes for c in sim_collectives)
        plan_bytes = sum(c.bytes for c in predicted)
        comm_err = error(plan_bytes, sim_bytes)
        kinds = ", ".join(
            f"{c.kind} {c.group} ×{c.count}" for c in sim_collectives if c.bytes >= 2**20
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
        "Rank 0 of each job (the first pipeline stage), one optimizer step (the second: "
        "AdamW's state exists), Llama-3 widths at 8,192 tokens, bf16, one sequence per "
        "data-parallel rank and pipeline micro-batch (one micro-batch per stage). Fake tensors "
        "cost operations, not bytes, so each model keeps its real widths with the number of "
        "blocks in the `blocks` column (Llama-3 has 32, 80 and 126); the planner is asked about "
        "the same reduced model. Memory cells: planner / simulated GiB; the planner's `other` "
        "without its CUDA-context allowance and allocator fragmentation (fake tensors see "
        "neither).",
        "",
        f"| layout | ranks | blocks | {head} | total error | simulated in |",
        "|---|---|---|" + "---|" * (len(KEYS) + 2),
        *rows,
        "",
        "Communication per step on rank 0 (summed unsharded bytes of every call, GiB):",
        "",
        "| layout | planner | simulated | error | collectives over 1 MiB (simulated) |",
        "|---|---|---|---|---|",
        *comm_rows,
        "",
        f"Beyond 10% (memory total or communication): {', '.join(misses) or 'none'}.",
    ]
    if not only:
        write_section("simulate_vs_planner", "\n".join(body))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
