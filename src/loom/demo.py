"""`make demo`: the one-stop pipeline on CPU, on the Python standard library: data (clean,
dedup, train the tokenizer, shards) -> tokenizer -> pretrain -> eval -> export, then a sample
from the model and the stage table. The report's path is printed by `loom run`.

Runs the same `loom` commands a user would type (printed as they run) into `demo-run/`.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

from loom.cli import main as loom
from loom.core.run_files import RunFiles
from loom.train.metrics import read_metrics

PIPELINE = Path(__file__).resolve().parents[2] / "configs" / "pipeline-tiny.toml"


def step(*args: str) -> None:
    print(f"\n$ loom {shlex.join(args)}", flush=True)
    if loom(list(args)) != 0:
        sys.exit(f"demo stopped: `loom {args[0]}` failed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo-run", help="folder for everything the demo writes")
    parser.add_argument(
        "--steps", type=int, default=None, help="pretraining steps (default: the pipeline's)"
    )
    args = parser.parse_args(argv)
    if not PIPELINE.is_file():
        sys.exit(f"demo needs {PIPELINE}; run it from a Loom checkout")
    out = Path(args.out)
    marker = out / ".loom-demo"
    if out.exists() and any(out.iterdir()) and not marker.exists():
        sys.exit(f"demo: {out} exists and was not made by the demo; pass another --out")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    marker.touch()
    started = time.perf_counter()

    overrides = [f"--run_dir={out}"]
    if args.steps:
        overrides.append(f"--pretrain.train.steps={args.steps}")
    step("run", str(PIPELINE), *overrides)
    prompt = "def read_config(path):"
    step("generate", str(out / "pretrain"), "--prompt", prompt, "--max-tokens", "80", "--seed", "0")
    step("status", str(out))

    val = [(r["step"], r["val_loss"]) for r in read_metrics(out / "pretrain") if "val_loss" in r]
    print("\nvalidation loss:  " + "  ".join(f"step {s}: {v:.3f}" for s, v in val))
    print(f"demo finished in {time.perf_counter() - started:.0f} s; everything is in {out}/")
    print(f"report: {RunFiles(out).report}")


if __name__ == "__main__":
    main()
