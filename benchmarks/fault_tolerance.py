"""Goodput under failures, and what a checkpoint costs the training loop, sync vs async.

Both on real runs of `loom train --nproc 2` (FSDP over 2 worker processes) on this machine:

1. Checkpoint cost: the same fixed number of steps with no periodic checkpoint, with a sync
   checkpoint every K steps, and with an async one every K steps; the training time per step
   (the run's wall time minus its set-up, over its steps), as a ratio to no checkpoints.
2. Goodput: a run of `--minutes` with one worker SIGKILLed from outside every `--kill-every`
   seconds, a checkpoint every `--checkpoint-minutes`, restarted by the launcher
   (`--max-restarts`), stopped with SIGTERM at the end; sync vs async checkpoints. Goodput and
   its breakdown come from the run's own `goodput.json`.

    python benchmarks/fault_tolerance.py            # writes fault_tolerance
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from report import write_section  # benchmarks/ is on the path when a script in it runs

from loom.cli import main as loom

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
MODEL = [
    "--model.vocab_size=8192",
    "--model.dim=384",
    "--model.n_layers=6",
    "--model.n_heads=6",
    "--model.n_kv_heads=2",
    "--model.ffn_hidden=1024",
    "--model.max_seq_len=256",
    "--model.tie_embeddings=false",
    "--train.batch_size=8",
    "--train.seq_len=256",
    "--train.precision=bf16",
    "--train.eval_interval=0",
    "--metrics.log_interval=10",
    "--metrics.progress=plain",
    "--metrics.tensorboard=false",
    "--checkpoint.keep=2",
]


def prepare(root: Path) -> Path:
    corpus = f"{sysconfig.get_paths()['stdlib']}/*.py"
    tok, data = root / "tokenizer", root / "data"
    for argv in (
        ["tokenizer", "train", "--input", corpus, "--vocab-size", "8192", "--out", str(tok)],
        ["data", "tokenize", "--input", corpus, "--tokenizer", str(tok), "--out", str(data)],
    ):
        if loom(argv) != 0:
            sys.exit(f"loom {argv[0]} failed")
    return data


def start(data: Path, run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "loom.cli", "train", str(CONFIG), "--nproc", "2"]
    cmd += [*MODEL, f"--data.path={data}", f"--run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait(process: subprocess.Popen[bytes]) -> None:
    _, err = process.communicate()
    if process.returncode != 0:
        sys.exit(f"training failed:\n{err.decode()[-3000:]}")


def ledger(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "goodput.json").read_text())


def checkpoint_cost(data: Path, root: Path, steps: int, every: int) -> dict[str, float]:
    """Training seconds per step for each checkpoint mode."""
    modes = {
        "none": [f"--checkpoint.interval={steps}"],
        "sync": [f"--checkpoint.interval={every}"],
        "async": [f"--checkpoint.interval={every}", "--checkpoint.async=true"],
    }
    per_step = {}
    for name, extra in modes.items():
        run_dir = root / f"cost-{name}"
        wait(start(data, run_dir, f"--train.steps={steps}", *extra))
        g = ledger(run_dir)
        per_step[name] = (g["wall_s"] - g["setup_s"]) / steps
        print(f"{name}: {per_step[name]:.3f} s/step, checkpoint stall {g['checkpoint_s']:.1f} s")
    return per_step


def run_with_failures(
    data: Path, run_dir: Path, minutes: float, kill_every: float, extra: list[str]
) -> dict[str, float]:
    process = start(data, run_dir, "--train.steps=1000000", "--max-restarts", "100", *extra)
    began = time.monotonic()
    next_kill = kill_every
    kills = 0
    while time.monotonic() - began < 60 * minutes:
        time.sleep(0.5)
        if process.poll() is not None:
            sys.exit(f"training ended early:\n{process.stderr.read().decode()[-3000:]}")
        if time.monotonic() - began >= next_kill and next_kill < 60 * minutes - 5:
            note = run_dir / ".ranks" / "rank-1.json"
            try:
                os.kill(json.loads(note.read_text())["pid"], signal.SIGKILL)
                kills += 1
            except (OSError, ValueError, KeyError):
                pass  # between attempts: no worker to kill yet
            next_kill += kill_every
    process.send_signal(signal.SIGTERM)
    wait(process)
    return {**ledger(run_dir), "kills": kills}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=3.0, help="length of each failure run")
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between kills")
    parser.add_argument("--checkpoint-minutes", type=float, default=0.5)
    parser.add_argument("--cost-steps", type=int, default=120)
    parser.add_argument("--cost-every", type=int, default=20, help="steps between checkpoints")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare(root)
        cost = checkpoint_cost(data, root, args.cost_steps, args.cost_every)
        runs = {}
        for name, extra in {
            "sync": [],
            "async": ["--checkpoint.async=true"],
        }.items():
            interval = [
                f"--checkpoint.interval_minutes={args.checkpoint_minutes}",
                "--checkpoint.interval=1000000",
            ]
            runs[name] = run_with_failures(
                data, root / f"faults-{name}", args.minutes, args.kill_every, interval + extra
            )
            print(name, json.dumps(runs[name], indent=1))

    rows = []
    for name, g in runs.items():
        rows.append(
            f"| {name} | {g['kills']} | {g['restarts']} | {g['wall_s']:.0f} "
            f"| {g['productive_s']:.0f} | **{g['goodput']:.1%}** | {g['restarts_s']:.0f} "
            f"| {g['recomputed_steps']} / {g['recomputed_s']:.0f} | {g['checkpoint_s']:.1f} "
            f"| {g['setup_s']:.0f} | {g['other_s']:.0f} |"
        )
    table = "\n".join(
        [
            "Model: 6 layers, dim 384, GQA 6/2, ffn 1024, vocab 8192 (≈ 15M parameters; a "
            "checkpoint with AdamW state ≈ 0.18 GB), batch 8 × 256, bf16, FSDP over 2 workers.",
            "",
            f"Checkpoint cost: {args.cost_steps} steps, a checkpoint every {args.cost_every} "
            "steps; training seconds per step (wall minus set-up, over the steps):",
            "",
            "| checkpoints | s/step | vs none |",
            "|---|---|---|",
            *[
                f"| {name} | {value:.3f} | **{value / cost['none']:.3f}×** |"
                for name, value in cost.items()
            ],
            "",
            f"Goodput: {args.minutes:g} min per run, rank 1 SIGKILLed every {args.kill_every:g} s, "
            f"a checkpoint every {args.checkpoint_minutes:g} min, `--max-restarts 100`, SIGTERM "
            "at the end (seconds):",
            "",
            "| checkpoints | kills | restarts | wall | productive | goodput | lost to restarts "
            "| recomputed steps / s | checkpoint stalls | set-up | other |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    print("\n" + table)
    if not args.no_write:
        write_section("fault_tolerance", table)


if __name__ == "__main__":
    main()
