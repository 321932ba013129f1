"""The planner against published training runs, and the speed of its search.

Throughput: reference/validation_runs.json (150 runs of other teams, 9 sources). The time
model's fitted constants come from the fit third (`loom.planner.validation.fit_split`); the
accuracy reported is on the other two thirds, which nothing was fitted on. Each constant gets a
sensitivity row: the held-out error with the constant at half and one and a half its value.
The older records of reference/published_runs.json (Megatron-LM 2021, Korthikanti 2022) are
held out too. Also times `loom plan`'s search for a 405B model on 16,384 H100s.

    python benchmarks/planner_validation.py   # writes the planner_validation section
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import fields, replace

from report import write_section  # benchmarks/ is on the path when a script in it runs

from loom.planner import published, validation
from loom.planner.cost import DEFAULT_CALIBRATION, Calibration
from loom.planner.report import describe
from loom.planner.search import PhysicsError, evaluate, plan
from loom.planner.spec import parse_spec

# Where each set (not fitted) constant comes from; fitted ones say which records.
SET_FROM = {
    "fp8_cast_passes": "counted: read the 16-bit input, its amax, write 8 bits",
    "attention_backward": "paper: FlashAttention-2 (Dao 2023) backward/forward rates",
    "ffn_elementwise_passes": "counted: SwiGLU reads gate and up, writes silu and product",
    "kernels_per_layer": "counted: operators in Loom's eager Llama block",
    "link_efficiency": "set: NCCL's usual bus efficiency",
    "collective_latency_s": "set: NCCL's usual launch latency",
    "dp_overlap": "set: reduction fully overlappable with the last backward",
    "step_overhead_s": "set: none",
}


def old_table(title: str, rows: list[published.Row], fmt: str = "{:.3g}") -> str:
    lines = [f"**{title}**", "", "| record | predicted | published | error |", "|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.record} | {fmt.format(r.predicted)} | {fmt.format(r.published)} "
            f"| {r.error:+.1%} |"
        )
    errors = [abs(r.error) for r in rows]
    lines += ["", f"median |error| {statistics.median(errors):.1%}, max {max(errors):.1%}", ""]
    return "\n".join(lines)


def layout(case: validation.Case) -> str:
    s = case.spec.strategy
    assert s is not None
    words = describe(evaluate(case.spec.model, case.spec.hardware, s)).split()
    tuned = f" (tuned: {', '.join(case.tuned)})" if case.tuned else ""
    return " ".join(words[:6]) + f" {s.precision}" + tuned


def case_table(rows: list[validation.Result]) -> list[str]:
    lines = [
        "| record | GPUs | layout | seq | predicted tok/s/GPU | published | error |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r.case.id):
        c = r.case
        hw = c.spec.hardware
        lines.append(
            f"| {c.id} | {hw.devices} × {hw.name} | {layout(c)} | {c.spec.model.seq_len} "
            f"| {r.predicted:,.0f} | {r.case.published:,.0f} | {r.error:+.1%} |"
        )
    return lines


def by_group(rows: list[validation.Result], key: str) -> list[str]:
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        name = r.case.source if key == "source" else r.case.spec.hardware.name
        groups[name].append(abs(r.error))
    lines = [f"| {key} | records | median \\|error\\| | max |", "|---|---|---|---|"]
    for name, errors in sorted(groups.items()):
        lines.append(
            f"| {name} | {len(errors)} | {statistics.median(errors):.1%} | {max(errors):.1%} |"
        )
    return lines


def sensitivity(held: list[validation.Case]) -> list[str]:
    lines = [
        "| constant | value | provenance | held-out median / max at ×0.5 | at ×1.5 |",
        "|---|---|---|---|---|",
    ]
    for f in fields(Calibration):
        value = getattr(DEFAULT_CALIBRATION, f.name)
        where = "fitted on the fit records" if f.name in validation.FITTED else SET_FROM[f.name]
        cells = []
        for factor in (0.5, 1.5):
            cal = replace(DEFAULT_CALIBRATION, **{f.name: value * factor})
            try:
                median, worst = validation.summary(validation.results(held, cal))
                cells.append(f"{median:.1%} / {worst:.1%}")
            except PhysicsError:
                cells.append("refused: a prediction above the peak")
        lines.append(f"| {f.name} | {value:g} | {where} | {cells[0]} | {cells[1]} |")
    return lines


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
    what = (
        f"{describe(best)}: {best.mfu:.0%} MFU, {best.days(15.6e12):.0f} days for 15.6T "
        "tokens (Llama 3 405B, published: tp 8 × pp 16 × dp 128, 38-41% MFU)"
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


def cli_seconds() -> tuple[float, float]:
    """Min and median of 5 runs of the whole command (interpreter start-up included)."""
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "loom", *CLI[1:]], check=True, capture_output=True)
        runs.append(time.perf_counter() - start)
    return min(runs), statistics.median(runs)


def main() -> None:
    cases = validation.load_cases()
    fit = [c for c in cases if c.fitted]
    held = [c for c in cases if not c.fitted and c.scored]
    unscored = [c for c in cases if not c.fitted and not c.scored]
    refit = validation.fit_calibration(fit)
    held_rows = validation.results(held)
    median, worst = validation.summary(held_rows)
    fit_median, fit_worst = validation.summary(validation.results(fit))
    sources = sorted({c.source for c in cases})
    records = published.load_records()
    seconds, best = search_time()
    cli_min, cli_median = cli_seconds()
    unscored_lines = []
    for c in unscored:
        if c.refused:
            unscored_lines.append(f"- {c.id}: refused by the planner: {c.refused}")
        else:
            r = validation.predict(c)
            unscored_lines.append(
                f"- {c.id} (low confidence in the record): predicted {r.predicted:,.0f}, "
                f"published {c.published:,.0f} ({r.error:+.1%})"
            )
    refit_text = ", ".join(
        f"{n} {getattr(refit, n):.3g} (source {getattr(DEFAULT_CALIBRATION, n):g})"
        for n in validation.FITTED
    )
    body = "\n".join(
        [
            f"**Throughput, tokens/s per GPU: {len(cases)} published runs from {len(sources)} "
            f"sources** ({', '.join(sources)}). Fitted on {len(fit)} records (every third per "
            f"source in id order, never a low-confidence one; fit error median "
            f"{fit_median:.1%}, max {fit_worst:.1%}); **held out: {len(held)} records, median "
            f"|error| {median:.1%}, max {worst:.1%}** (target: median ≤ 10%, none above 35%). "
            f"{len(unscored)} held-out records are not scored (listed below).",
            "",
            f"Refitting the fit records from the source's values gives: {refit_text}.",
            "",
            "By source (held out):",
            "",
            *by_group(held_rows, "source"),
            "",
            "By GPU (held out):",
            "",
            *by_group(held_rows, "GPU"),
            "",
            "Held-out records:",
            "",
            *case_table(held_rows),
            "",
            "Not scored:",
            "",
            *unscored_lines,
            "",
            "Fit records (the constants were fitted on these; their error is not accuracy):",
            "",
            *case_table(validation.results(fit)),
            "",
            "**Constants of the time model, their provenance and sensitivity** (held-out median "
            f"/ max |error| with the constant scaled; at its value: {median:.1%} / {worst:.1%}):",
            "",
            *sensitivity(held),
            "",
            "**Older published runs (shared/reference/published_runs.json), held out** — no "
            "constant is fitted on them. Assumed where records are silent: GPT blocks, "
            "micro-batch 1, 16-bit Megatron-style states, unfused attention (2021-22).",
            "",
            old_table(
                "Megatron-LM 2021, Table 1: TFLOP/s per GPU",
                published.megatron_throughput(records),
                "{:.0f}",
            ),
            old_table(
                "Korthikanti et al. 2022, Table 5: iteration time (s)",
                published.korthikanti_times(records),
            ),
            old_table(
                "Korthikanti et al. 2022, Table 4: forward + backward ms per 22B block",
                published.korthikanti_layer_times(records),
                "{:.1f}",
            ),
            "A known flaw shows in Table 4: without sequence parallelism the planner charges "
            "every hidden-sized elementwise pass (norms, residual adds, rotary embeddings, "
            "transposes) to every tensor-parallel rank, where only the residual stream's norms "
            "and adds are replicated, so the rows without sequence parallelism come out slow "
            "(the measured saving of sequence parallelism is 0.6 ms per block). Splitting the "
            "passes (residual stream counted: 42 eager, 11 fused) reproduces all five rows "
            "within 5%, but refitted it leaves KempnerForge's multi-node TP 4 + FSDP runs (whose "
            "network the report does not state) at up to 37% on the held-out part, so it is not "
            "adopted yet.",
            "",
            old_table(
                "Narayanan et al. 2021 §5.1: training days",
                published.training_days(records),
                "{:.1f}",
            ),
            "**Transcription checks, not validation**: the two tables below compare the "
            "planner's memory formulas with the papers' own formulas (ZeRO's Table 1 is its "
            "formula, printed), so they show the formulas were copied right, not that they "
            "predict real memory.",
            "",
            old_table("ZeRO Table 1: model states per device (GB)", published.zero_memory(records)),
            old_table(
                "Korthikanti et al. 2022: activation bytes per layer (22B, s 2048, b 4, t 8)",
                published.korthikanti_activations(),
            ),
            f"Search, llama3-405b on 16,384 H100 (global batch 2048 × 8192): "
            f"**{seconds * 1e3:.0f} ms** in-process (median of 5); the whole command "
            f"`{' '.join(CLI)}` (Python start-up and imports included, no torch) "
            f"**{cli_min:.2f} s** min, {cli_median:.2f} s median of 5. Best: {best}.",
        ]
    )
    print(body)
    write_section("planner_validation", body)


if __name__ == "__main__":
    main()
