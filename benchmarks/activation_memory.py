"""Activation memory per transformer layer: measured, the planner's count, Korthikanti's formula.

For each recomputation mode Loom has (none, selective, full), in fp32 and under bf16 autocast,
at several batch × sequence sizes: the bytes one Llama block keeps from the end of the forward
pass to the start of the backward pass, measured with torch's memory tracker (activation bytes
alive after forward + loss of a 2-layer model minus those of a 1-layer one, so embedding, head
and loss cancel). Next to it the planner's prediction for the same block
(`loom.planner.memory.activation_bytes_per_layer`, calibrated at one other shape) and
Korthikanti et al. 2022's formula for a GPT layer of the same s, b, h, a (the planner's GPT
branch). Then the cost: forward + backward time per step in each mode, as a ratio to none.

    python benchmarks/activation_memory.py               # writes activation_memory
    python benchmarks/activation_memory.py --no-write    # prints only
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch
from report import write_section  # benchmarks/ is on the path when a script in it runs

from loom.core.loss import cross_entropy
from loom.models.llama import ModelConfig, build_model
from loom.parallel.recompute import apply_recompute
from loom.planner.calibrate import measure_activations
from loom.planner.memory import activation_bytes_per_layer
from loom.planner.spec import Strategy, model_from_config

MODES = ("none", "selective", "full")
MIB = 2**20


def per_layer_measured(cfg: ModelConfig, batch: int, seq: int, mode: str, precision: str) -> float:
    one = measure_activations(replace(cfg, n_layers=1), batch, seq, mode, precision)
    two = measure_activations(replace(cfg, n_layers=2), batch, seq, mode, precision)
    return two - one


def step_times(
    cfg: ModelConfig, batch: int, seq: int, precision: str, rounds: int
) -> dict[str, tuple[float, float]]:
    """Median forward + backward seconds per mode, and the median per-round ratio to none
    (modes alternate within each round, so machine noise hits them alike)."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen)
    models = {}
    for mode in MODES:
        models[mode] = build_model(cfg, "cpu")
        models[mode].init_weights(seed=0)
        apply_recompute(models[mode], mode)

    def step(model: torch.nn.Module) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return elapsed

    for model in models.values():  # warm-up
        step(model)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    ratios: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(rounds):
        this_round = {mode: step(model) for mode, model in models.items()}
        for mode in MODES:
            times[mode].append(this_round[mode])
            ratios[mode].append(this_round[mode] / this_round["none"])
    return {m: (statistics.median(times[m]), statistics.median(ratios[m])) for m in MODES}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="4x512,4x2048,1x8192", help="batch×seq, comma-separated")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=512, help="small: cancels out per layer")
    parser.add_argument("--time-layers", type=int, default=4, help="layers of the timed model")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    precisions = args.precisions.split(",")
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.sizes.split(",")]
    max_seq = max(seq for _, seq in sizes)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        n_layers=1,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        ffn_hidden=args.ffn,
        max_seq_len=max_seq,
        tie_embeddings=False,
    )

    rows = []
    worst = 0.0
    for batch, seq in sizes:
        shape = model_from_config(cfg, seq)
        gpt = replace(shape, arch="gpt", kv_heads=args.heads, ffn_hidden=4 * args.dim)
        sbh = batch * seq * args.dim
        for precision in precisions:
            for mode in MODES:
                measured = per_layer_measured(cfg, batch, seq, mode, precision)
                strategy = Strategy(recompute=mode, micro_batch=batch, precision=precision)
                planned = activation_bytes_per_layer(shape, strategy)
                korthikanti = activation_bytes_per_layer(gpt, strategy)
                worst = max(worst, abs(planned / measured - 1))
                rows.append(
                    f"| {batch}×{seq} | {precision} | {mode} | **{measured / MIB:.1f}** "
                    f"| {measured / sbh:.1f} | {planned / MIB:.1f} | {planned / measured - 1:+.1%} "
                    f"| {korthikanti / MIB:.1f} | {korthikanti / sbh:.0f} |"
                )
                print(rows[-1], flush=True)

    batch, seq = sizes[0]
    timed = replace(cfg, n_layers=args.time_layers)
    time_rows = []
    for precision in precisions:
        result = step_times(timed, batch, seq, precision, args.rounds)
        cells = " | ".join(f"{result[m][0]:.2f} s ({result[m][1]:.2f}×)" for m in MODES)
        time_rows.append(f"| {precision} | {cells} |")
        print(time_rows[-1], flush=True)

    table = "\n".join(
        [
            f"Block: dim {args.dim}, {args.heads}/{args.kv_heads} heads/KV heads, SwiGLU ffn "
            f"{args.ffn} (not the shape the planner was calibrated at: dim 512, 8/4 heads, ffn "
            "1408). Measured = MemTracker's activation bytes after forward + loss, 2 layers "
            "minus 1, MiB per layer (under bf16 it includes the bf16 weight copies the matmuls "
            "save). B/sbh = measured bytes per s·b·h. Planner = `activation_bytes_per_layer` "
            "for the same block. Korthikanti = the planner's GPT count (Korthikanti et al. "
            "2022, 16-bit, dropout, s × s scores): none sbh(34 + 5as/h), selective 34sbh, full "
            "2sbh — shown to make visible what flash attention and no dropout change.",
            "",
            "| b×s | precision | recompute | measured MiB | B/sbh | planner MiB "
            "| planner / measured | Korthikanti MiB | Korthikanti B/sbh |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Largest |planner / measured − 1|: {worst:.1%}.",
            "",
            f"Forward + backward (no optimizer step) of a {args.time_layers}-layer model at "
            f"batch {batch} × seq {seq}: median of {args.rounds} steps per mode, modes "
            "alternating; in brackets the median per-round ratio to none.",
            "",
            "| precision | none | selective | full |",
            "|---|---|---|---|",
            *time_rows,
        ]
    )
    print("\n" + table)
    if not args.no_write:
        write_section("activation_memory", table)


if __name__ == "__main__":
    main()
