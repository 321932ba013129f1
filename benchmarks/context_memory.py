"""Per-rank memory of a long sequence under context parallelism (`parallel.cp`), measured.

For cp = 1, 2 and 4, `loom train` (cp processes, one sequence per step, so every rank holds a
share of the same sequence) runs the tiny preset with 4 layers at a long sequence and at a
short one; each rank's peak resident memory comes from metrics.jsonl. The long run's peak minus
the short run's is what the sequence costs the rank (activations, the ring's blocks in flight,
logits): it should fall about as 1/cp. Process memory (torch, the model, optimizer
state) is in both runs and cancels.

    python benchmarks/context_memory.py            # writes context_memory
    python benchmarks/context_memory.py --seq 4096 --no-write
    python benchmarks/context_memory.py --budget 2.5   # writes context_budget

`--budget GIB`: for each cp, the longest sequence (doubling from 4,096 up to `--max-seq`) whose
run keeps every rank's peak resident memory under the budget, measured the same way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from report import write_section  # benchmarks/ is on the path when a script in it runs

REPO = Path(__file__).resolve().parents[1]
SHORT = 512


def prepare(root: Path) -> Path:
    corpus = str(Path(sysconfig.get_paths()["stdlib"]) / "*.py")
    tok, data = root / "tokenizer", root / "data"
    for args in (
        ["tokenizer", "train", "--input", corpus, "--vocab-size", "8192", "--out", str(tok)],
        ["data", "tokenize", "--input", corpus, "--tokenizer", str(tok), "--out", str(data)],
    ):
        subprocess.run([sys.executable, "-m", "loom", *args], check=True, capture_output=True)
    return data


def peak_per_rank(data: Path, run_dir: Path, cp: int, seq: int) -> list[float]:
    """Each rank's peak resident GiB over a 3-step run of one `seq`-token sequence per step."""
    cmd = [sys.executable, "-m", "loom", "train", str(REPO / "configs" / "tiny.toml")]
    if cp > 1:
        cmd += ["--nproc", str(cp)]
    cmd += [
        f"--data.path={data}",
        f"--run_dir={run_dir}",
        "--model.n_layers=4",
        f"--model.max_seq_len={seq}",
        f"--train.seq_len={seq}",
        "--train.batch_size=1",
        "--train.micro_batch_size=1",
        "--train.steps=3",
        "--train.eval_interval=0",
        "--checkpoint.interval=1000",
        "--metrics.log_interval=1",
        "--metrics.tensorboard=false",
        "--metrics.progress=plain",
        f"--parallel.cp={cp}",
        "--parallel.dp_shard=1",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return last.get("peak_mem_gib_per_rank", [last["peak_mem_gib"]])


def largest_under(data: Path, root: Path, budget: float, max_seq: int) -> list[str]:
    """Table rows: per cp, the longest doubling sequence length whose busiest rank peaks under
    `budget` GiB, with that peak and the next length's (the first over, or none tried)."""
    rows = []
    for cp in (1, 2, 4):
        best, best_peak, over = 0, 0.0, "not tried (the cap)"
        seq = 4096
        while seq <= max_seq:
            peak = max(peak_per_rank(data, root / f"budget{cp}-{seq}", cp, seq))
            print(f"cp {cp} seq {seq}: {peak:.2f} GiB", flush=True)
            if peak > budget:
                over = f"{seq:,}: {peak:.2f}"
                break
            best, best_peak = seq, peak
            seq *= 2
        rows.append(f"| {cp} | {best:,} | {best_peak:.2f} | {over} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--budget", type=float, help="GiB per rank: the longest sequence under it")
    parser.add_argument("--max-seq", type=int, default=32768)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.budget:
        with tempfile.TemporaryDirectory() as tmp:
            rows = largest_under(prepare(Path(tmp)), Path(tmp), args.budget, args.max_seq)
        body = f"""The same runs (tiny preset, 4 layers, one sequence per step, 3 steps, fp32), the
sequence doubled from 4,096 tokens until the busiest rank's peak resident memory passes
{args.budget} GiB (whole-process memory: torch, the model and its optimizer state included),
up to {args.max_seq:,} tokens.

| cp | longest sequence under {args.budget} GiB per rank | its peak GiB | next length: peak GiB |
|---|---|---|---|
{chr(10).join(rows)}
"""
        if not args.no_write:
            write_section("context_budget", body)
        print(body)
        return
    rows, costs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare(root)
        for cp in (1, 2, 4):
            long = peak_per_rank(data, root / f"long{cp}", cp, args.seq)
            short = peak_per_rank(data, root / f"short{cp}", cp, SHORT)
            costs[cp] = max(a - b for a, b in zip(long, short, strict=True))
            rows.append(
                f"| {cp} | {args.seq // cp:,} | {max(long):.2f} | {max(short):.2f} | "
                f"{costs[cp]:.2f} | {costs[cp] / costs[1]:.2f} | {1 / cp:.2f} |"
            )
            print(rows[-1], flush=True)
    header = (
        f"| cp | tokens per rank | peak GiB, {args.seq:,} tokens | peak GiB, {SHORT} tokens "
        "| sequence's cost, GiB | vs cp 1 | 1/cp |"
    )
    body = f"""`loom train` of the tiny preset with 4 layers (dim 256, 8 heads, 4 KV heads,
vocabulary 8,192), one {args.seq:,}-token sequence per step, on cp processes (`parallel.cp`,
each rank two chunks of the sequence); 3 steps, fp32. Peak resident memory of the busiest rank
from metrics.jsonl, and the same with {SHORT}-token sequences: their difference is what the long
sequence costs a rank (its activations, the ring attention's blocks in flight and its
tiles of scores, its logits and loss). cp 1 runs PyTorch's fused attention, cp > 1 Loom's ring
attention. Each rank's peak is its own process's.

{header}
|---|---|---|---|---|---|---|
{chr(10).join(rows)}
"""
    if not args.no_write:
        write_section("context_memory", body)
    print(body)


if __name__ == "__main__":
    main()
