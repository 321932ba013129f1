"""`loom run configs/pipeline-tiny.toml` (the demo) as a user meets it, each a real `loom run`
process on this machine:

1. a fresh run: wall time and each stage's seconds (pipeline.json);
2. the same command again: every stage skipped (the cost of checking);
3. a fresh run SIGKILLed just after the pretrain stage's checkpoint at step `--kill-after`,
   then the same command again: total wall time against (1), the steps trained twice, and
   whether a finished stage ran again;
4. a fresh run with the pretrain stage on 2 worker processes (`[pretrain.launch] nproc = 2`,
   FSDP over them): the stage's seconds against (1)'s one process;
5. `loom report` on (1): seconds and size of report.html.

    python benchmarks/pipeline_run.py            # writes pipeline_run
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import write_section  # benchmarks/ is on the path when a script in it runs

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "configs" / "pipeline-tiny.toml"


def loom_run(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "loom", "run", str(PIPELINE), f"--run_dir={run_dir}", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def timed(run_dir: Path, *extra: str) -> float:
    start = time.perf_counter()
    code = loom_run(run_dir, *extra).wait()
    if code:
        sys.exit(f"loom run {run_dir} failed with exit {code}")
    return time.perf_counter() - start


def stage_seconds(run_dir: Path) -> dict[str, float]:
    state = json.loads((run_dir / "pipeline.json").read_text())
    return {s["name"]: s["seconds"] for s in state["stages"]}


def prediction_against_run(run_dir: Path) -> tuple[float, float, float, float]:
    """The planner's pretrain tokens/s (recorded in pipeline.json before the stage ran) and
    the median, lowest and highest logged tokens/s of the stage's run."""
    predicted = json.loads((run_dir / "pipeline.json").read_text())["plan"]["pretrain"]
    lines = (run_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()
    rates = [json.loads(line)["tokens_per_s"] for line in lines if "tokens_per_s" in line]
    return predicted["tokens_per_s"], statistics.median(rates), min(rates), max(rates)


def killed_and_resumed(run_dir: Path, kill_after: int) -> dict[str, float | int | bool]:
    """SIGKILL the run group once pretrain's checkpoint at `kill_after` is complete."""
    start = time.perf_counter()
    proc = loom_run(run_dir)
    done = run_dir / "pretrain" / "checkpoints" / f"step-{kill_after}"
    latest = run_dir / "pretrain" / "checkpoints" / "latest"
    while not (latest.is_symlink() and latest.resolve() == done.resolve()):
        if proc.poll() is not None:
            sys.exit(f"loom run ended before the checkpoint at step {kill_after}")
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.perf_counter() - start
    manifest = run_dir / "data" / "manifest.json"
    data_mtime = manifest.stat().st_mtime_ns
    resumed = timed(run_dir)
    goodput = json.loads((run_dir / "pretrain" / "goodput.json").read_text())
    return {
        "killed_at_s": killed_at,
        "resume_s": resumed,
        "total_s": killed_at + resumed,
        "recomputed_steps": goodput["recomputed_steps"],
        "data_redone": manifest.stat().st_mtime_ns != data_mtime,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-after", type=int, default=100, help="pretrain checkpoint step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fresh = timed(root / "fresh")
        stages = stage_seconds(root / "fresh")
        predicted, measured, low, high = prediction_against_run(root / "fresh")
        print(f"fresh: {fresh:.1f} s {stages}")
        again = timed(root / "fresh")
        print(f"again: {again:.1f} s")
        kill = killed_and_resumed(root / "killed", args.kill_after)
        print(f"killed at step {args.kill_after} and resumed: {kill}")
        two = timed(root / "two", "--pretrain.launch.nproc=2", "--pretrain.parallel.dp_shard=2")
        two_stages = stage_seconds(root / "two")
        print(f"2 workers: {two:.1f} s {two_stages}")
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "loom", "report", str(root / "fresh")],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        report_s = time.perf_counter() - start
        report_kib = (root / "fresh" / "report.html").stat().st_size / 1024

    rows = "\n".join(
        f"| {name} | {seconds:.1f} | {two_stages[name]:.1f} |" for name, seconds in stages.items()
    )
    body = f"""## One-stop pipeline: `loom run configs/pipeline-tiny.toml` (issue 9)

The demo pipeline (data prepare of the standard library with exact + near dedup, an 8,192-token
BPE tokenizer, 200 pretraining steps of the tiny model, held-out perplexity, HF export), each
run a real `loom run` process; `benchmarks/pipeline_run.py`.

| stage | seconds, 1 process | seconds, pretrain on 2 workers |
|---|---|---|
{rows}
| **whole command** | **{fresh:.1f}** | **{two:.1f}** |

- The same command again, nothing changed: **{again:.1f} s** (every stage skipped; validation,
  the planner's prediction and the report).
- Killed (SIGKILL to the whole process group) just after the pretrain checkpoint at step
  {args.kill_after}, after {kill["killed_at_s"]:.1f} s, then the same command:
  {kill["resume_s"]:.1f} s more, **{kill["total_s"]:.1f} s in all =
  {kill["total_s"] / fresh:.2f}× the uninterrupted run**; {kill["recomputed_steps"]} step(s)
  trained twice; data stage run again: {"yes" if kill["data_redone"] else "no"}.
- Pretrain on 2 worker processes (`--pretrain.launch.nproc=2 --pretrain.parallel.dp_shard=2`,
  torchrun's agent, gloo, FSDP): {two_stages["pretrain"] / stages["pretrain"]:.2f}× the
  one-process stage time. On 2 cores the two workers share the cores the single process
  used alone (plus process start-up and gradient all-reduces); the layout is for GPUs.
- The planner's prediction for the pretrain stage (printed by `loom run` before it starts,
  from this machine's calibrated profile): **{predicted:,.0f} tokens/s**; the run logged a
  median of {measured:,.0f} ({low:,.0f}–{high:,.0f}) over its records: the prediction is
  **{predicted / measured - 1:+.0%}** (target: within 25%).
- `loom report` on the fresh run: {report_s:.1f} s, report.html {report_kib:.0f} KiB (figures
  embedded).
"""
    write_section("pipeline_run", body)
    print(body)


if __name__ == "__main__":
    main()
