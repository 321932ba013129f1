"""Training-step throughput: Loom's model vs transformers' LlamaForCausalLM, side by side.

Both models get the same configuration (≈ 34M parameters, GQA), the same initial weights
(checked: equal first loss), the same AdamW built by the same function, the same loss
function, the same token batches and the same precision; HF runs with `use_cache=False` (no KV
cache is built in training), and the compiled rows compile both sides' forward + loss the same
way. Steps are timed in rounds whose order alternates (Loom, HF, HF, Loom, ...) so machine
noise and drift hit both alike; the ratio is the median of per-round ratios with its spread,
and "parity" when the spread covers 1.0.

    python benchmarks/train_throughput.py   # fp32 + bf16, eager and compiled; writes BENCHMARKS.md
    python benchmarks/train_throughput.py --preset llama3.2-1b --batch 4 --seq 2048   # on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from report import write_section  # benchmarks/ is on the path when a script in it runs
from torch import nn

from loom.core.config import OptimizerConfig
from loom.core.loss import cross_entropy
from loom.core.presets import get_preset
from loom.models.hf import hf_config_dict, to_hf_state_dict
from loom.models.llama import ModelConfig, build_model
from loom.parallel.compile import ForwardLoss, compile_forward_loss, forward_loss
from loom.planner.hardware import peak_flops
from loom.train.optim import build_optimizer

BENCH_MODEL = ModelConfig(
    preset="bench-34m",
    vocab_size=8192,
    dim=512,
    n_layers=8,
    n_heads=8,
    n_kv_heads=4,
    ffn_hidden=1536,
    max_seq_len=1024,
)


@dataclass
class Contender:
    name: str
    step: Callable[[], float]
    times: list[float]


def make_step(
    model: nn.Module,
    forward_and_loss: ForwardLoss,
    batches: list[torch.Tensor],
    precision: str,
    device: torch.device,
) -> Callable[[], float]:
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-3))
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    state = {"i": 0}

    def step() -> float:
        batch = batches[state["i"] % len(batches)]
        state["i"] += 1
        with autocast:
            loss = forward_and_loss(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # also synchronises the device

    return step


def build_pair(cfg: ModelConfig, device: torch.device) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    loom_model = build_model(cfg, device)
    loom_model.init_weights()
    hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg), use_cache=False)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa").to(
        device
    )
    hf_model.load_state_dict(to_hf_state_dict(loom_model.state_dict(), cfg), strict=False)
    hf_model.train()
    return loom_model, hf_model


def measure(
    cfg: ModelConfig,
    precision: str,
    compiled: bool,
    batch: int,
    seq: int,
    rounds: int,
    steps_per_round: int,
    device: torch.device,
) -> dict[str, float]:
    loom_model, hf_model = build_pair(cfg, device)
    wrap = compile_forward_loss if compiled else forward_loss  # as the trainer does
    loom_step = wrap(loom_model, cross_entropy)
    hf_step = wrap(lambda x: hf_model(x, use_cache=False).logits, cross_entropy)
    gen = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=gen).to(device)
        for _ in range(4)
    ]
    with torch.no_grad():  # same weights, same function
        first = batches[0][:, :-1]
        a = cross_entropy(loom_model(first), batches[0][:, 1:]).item()
        b = cross_entropy(hf_model(first).logits, batches[0][:, 1:]).item()
    assert abs(a - b) < 1e-3, f"Loom and HF disagree on the same weights: {a} vs {b}"
    contenders = [
        Contender("loom", make_step(loom_model, loom_step, batches, precision, device), []),
        Contender("hf", make_step(hf_model, hf_step, batches, precision, device), []),
    ]
    for c in contenders:  # warm-up (and compilation)
        for _ in range(2):
            c.step()
    round_ratios = []
    for r in range(rounds):
        per_round = {}
        for c in contenders if r % 2 == 0 else contenders[::-1]:  # A B, B A, A B, ...
            round_times = []
            for _ in range(steps_per_round):
                start = time.perf_counter()
                c.step()
                round_times.append(time.perf_counter() - start)
            c.times.extend(round_times)
            per_round[c.name] = statistics.median(round_times)
        round_ratios.append(per_round["hf"] / per_round["loom"])
    tokens = batch * seq
    peak, _ = peak_flops(device, precision)
    flops = cfg.flops_per_token(seq)
    out = {}
    for c in contenders:
        tps = tokens / statistics.median(c.times)
        out[f"{c.name}_tokens_per_s"] = tps
        out[f"{c.name}_of_peak"] = tps * flops / peak if peak else 0.0
    out["ratio"] = statistics.median(round_ratios)  # per round: both sides saw the same machine
    out["ratio_min"], out["ratio_max"] = min(round_ratios), max(round_ratios)
    out["peak_tflops"] = peak / 1e12
    return out


def verdict(low: float, high: float) -> str:
    """What the per-round spread of Loom / HF supports."""
    if low <= 1.0 <= high:
        return "parity"
    return "Loom faster" if low > 1.0 else "HF faster"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--preset", default=None, help="a Loom preset instead of the 34M benchmark model"
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--steps-per-round", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled rows")
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone"
    )
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_preset(args.preset) if args.preset else BENCH_MODEL
    precisions = args.precisions.split(",")
    cases = [(p, False) for p in precisions] + (
        [] if args.no_compile else [(p, True) for p in precisions]
    )
    rows = []
    for precision, compiled in cases:
        r = measure(
            cfg,
            precision,
            compiled,
            args.batch,
            args.seq,
            args.rounds,
            args.steps_per_round,
            device,
        )
        label = f"{precision}{' + compile (both)' if compiled else ''}"
        rows.append(
            f"| {label} | {r['loom_tokens_per_s']:,.0f} | {r['hf_tokens_per_s']:,.0f} "
            f"| **{r['ratio']:.2f}** ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) "
            f"| {verdict(r['ratio_min'], r['ratio_max'])} "
            f"| {r['loom_of_peak']:.0%} | {r['hf_of_peak']:.0%} | {r['peak_tflops']:.3g} |"
        )
        print(rows[-1], flush=True)
    shape = f"{cfg.n_layers} layers, dim {cfg.dim}, {cfg.n_heads}/{cfg.n_kv_heads} heads/KV heads"
    model_line = " ".join(
        [
            f"Model: {cfg.preset}, {cfg.num_params() / 1e6:.1f}M parameters ({shape},",
            f"vocab {cfg.vocab_size}); batch {args.batch} × seq {args.seq}; AdamW; median of",
            f"{args.rounds}×{args.steps_per_round} steps per side, the order alternating by",
            "round (Loom, HF, HF, Loom, ...); Loom / HF is the median of per-round ratios, in",
            "brackets the lowest and highest; 'parity' when that spread covers 1.0.",
            "HF: LlamaForCausalLM, SDPA attention, use_cache=False; compiled rows compile both.",
            "FLOPs/token = 6·N + 12·L·d·seq; 'of peak' divides achieved FLOP/s by the measured",
            "matmul peak (CPU) or the datasheet peak (GPU) for that precision.",
        ]
    )
    table = "\n".join(
        [
            model_line,
            "",
            "| precision | Loom tokens/s | HF tokens/s | Loom / HF | verdict | Loom of peak "
            "| HF of peak | peak TFLOP/s |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print("\n" + table)
    if not args.no_write:
        section = "train_throughput" + ("_gpu" if device.type == "cuda" else "")
        write_section(section, table)


if __name__ == "__main__":
    main()
