"""The planner against every published record it is validated on, and the speed of its search.

One constant is fitted (the matmul efficiency ceiling, on meg21_T1_145.6B); every other row is
a prediction. Also times `loom plan`'s search for a 405B model on 16,384 H100s.

    python benchmarks/planner_validation.py   # writes the planner_validation section
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from report import write_section  # benchmarks/ is on the path when a script in it runs

from loom.planner import published
from loom.planner.cost import DEFAULT_CALIBRATION
from loom.planner.search import plan
from loom.planner.spec import parse_spec


def table(title: str, rows: list[published.Row], fmt: str = "{:.3g}") -> str:
    lines = [f"**{title}**", "", "| record | predicted | published | error |", "|---|---|---|---|"]
    for r in rows:
        fitted = " (fitted)" if r.record == published.FIT_RECORD else ""
        lines.append(
            f"| {r.record}{fitted} | {fmt.format(r.predicted)} | {fmt.format(r.published)} "
            f"| {r.error:+.1%} |"
        )
    errors = [abs(r.error) for r in rows if r.record != published.FIT_RECORD]
    lines += ["", f"median |error| {statistics.median(errors):.1%}, max {max(errors):.1%}", ""]
    return "\n".join(lines)


def search_time() -> tuple[float, str]:
    spec = parse_spec(
        {
            "model": {"preset": "llama3-405b", "seq_len": 8192},
            "hardware": {"gpu": "h100", "n_gpus": 16384},
            "search": {"global_batch": 2048},
            "training": {"tokens": 15.6e12},
        }
    )
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        best, _ = plan(spec)
        runs.append(time.perf_counter() - start)
    s = best.strategy
    what = (
        f"tp {s.tp} × pp {s.pp} × dp {s.dp}, micro-batch {s.micro_batch}, {s.recompute} "
        f"recompute, ZeRO {s.zero_stage}: {best.mfu:.0%} MFU, {best.days(15.6e12):.0f} days for "
        "15.6T tokens"
    )
    return statistics.median(runs), what


CLI = [
    "loom",
    "plan",
    "--model",
    "llama3-405b",
    "--gpu",
    "h100",
    "--gpus",
    "16384",
    "--seq-len",
    "8192",
    "--global-batch-tokens",
    "16e6",
    "--tokens",
    "15.6e12",
]


def cli_seconds() -> float:
    runs = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "loom.cli", *CLI[1:]], check=True, capture_output=True
        )
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def main() -> None:
    records = published.load_records()
    fitted = published.fit_matmul_efficiency(records)
    assert fitted == DEFAULT_CALIBRATION.matmul_efficiency, (fitted, DEFAULT_CALIBRATION)
    seconds, best = search_time()
    body = "\n".join(
        [
            f"Fitted: matmul efficiency ceiling {fitted} on {published.FIT_RECORD} (the only "
            "fitted constant; link efficiency 0.75, 10 µs per collective and 1 µs per ring "
            "step are set, not fitted). Assumed where records are silent: GPT blocks, "
            "micro-batch 1, 16-bit Megatron-style states, no interleaving unless "
            "virtual_stages is given.",
            "",
            table(
                "Megatron-LM 2021, Table 1: TFLOP/s per GPU",
                published.megatron_throughput(records),
                "{:.0f}",
            ),
            table(
                "Korthikanti et al. 2022, Table 5: iteration time (s)",
                published.korthikanti_times(records),
            ),
            table(
                "Narayanan et al. 2021 §5.1: training days",
                published.training_days(records),
                "{:.1f}",
            ),
            table("ZeRO Table 1: model states per device (GB)", published.zero_memory(records)),
            table(
                "Korthikanti et al. 2022: activation bytes per layer (22B, s 2048, b 4, t 8)",
                published.korthikanti_activations(),
            ),
            f"Search, llama3-405b on 16,384 H100 (global batch 2048 × 8192): "
            f"**{seconds * 1e3:.0f} ms** in-process (median of 5); the whole command "
            f"`{' '.join(CLI)}` (Python start-up and imports included) **{cli_seconds():.2f} s**. "
            f"Best: {best}.",
        ]
    )
    print(body)
    write_section("planner_validation", body)


if __name__ == "__main__":
    main()
