"""`make demo`: tokenizer -> shards -> pretraining -> sampling, on CPU, on the standard library.

Runs the same `loom` commands a user would type (printed as they run) into `demo-run/`.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from loom.cli import main as loom
from loom.train.metrics import read_metrics

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.toml"


def step(*args: str) -> None:
    print(f"\n$ loom {shlex.join(args)}", flush=True)
    if loom(list(args)) != 0:
        sys.exit(f"demo stopped: `loom {args[0]}` failed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-run", help="folder for everything the demo writes")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: configs/tiny.toml)"
    )
    args = parser.parse_args(argv)
    if not CONFIG.is_file():
        sys.exit(f"demo needs {CONFIG}; run it from a Loom checkout")
    out = Path(args.out)
    marker = out / ".loom-demo"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        sys.exit(f"demo: {out} exists and was not made by the demo; pass another --out")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    marker.touch()
    corpus = f"{sysconfig.get_paths()['stdlib']}/*.py"
    started = time.perf_counter()

    step(
        "tokenizer",
        "train",
        "--input",
        corpus,
        "--vocab-size",
        "8192",
        "--out",
        str(out / "tokenizer"),
    )
    step(
        "data",
        "tokenize",
        "--input",
        corpus,
        "--tokenizer",
        str(out / "tokenizer"),
        "--out",
        str(out / "data"),
    )
    overrides = [f"--data.path={out / 'data'}", f"--run_dir={out / 'run'}"]
    if args.steps:
        overrides.append(f"--train.steps={args.steps}")
    step("train", str(CONFIG), *overrides)
    prompt = "def read_config(path):"
    step("generate", str(out / "run"), "--prompt", prompt, "--max-tokens", "80", "--seed", "0")

    val = [(r["step"], r["val_loss"]) for r in read_metrics(out / "run") if "val_loss" in r]
    print("\nvalidation loss:  " + "  ".join(f"step {s}: {v:.3f}" for s, v in val))
    print(f"demo finished in {time.perf_counter() - started:.0f} s; everything is in {out}/")


if __name__ == "__main__":
    main()
