"""Memory tiers side by side: peak RSS and step time of `loom train` with memory.offload none,
optimizer, optimizer + activation offload, and optimizer + the NVMe tier (offload_dir and
host_budget_gb), each run in its own process (its peak RSS is its own), the order alternating
across repeats; next to each the planner's prediction. Then the CPU AdamW step itself:
OffloadAdamW against torch's AdamW (fused=True, foreach=True) and, where a Python with the
`deepspeed` package is given, DeepSpeedCPUAdam, on the same parameter count in one process,
alternating.

    python benchmarks/memory_tiers.py                 # writes memory_tiers into BENCHMARKS.md
    python benchmarks/memory_tiers.py --no-write      # prints only
    python benchmarks/memory_tiers.py --deepspeed-python /tmp/dsvenv/bin/python

DeepSpeed is not a Loom dependency: the peer runs under a separate interpreter that has it
(e.g. `python -m venv /tmp/dsvenv && /tmp/dsvenv/bin/pip install deepspeed hjson ninja
py-cpuinfo pydantic msgpack einops psutil`, with this venv's site-packages on PYTHONPATH for
torch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from fault_tolerance import prepare  # benchmarks/ is on the path when a script in it runs
from report import write_section

from loom.core.config import load_config
from loom.parallel.dims import resolve
from loom.planner.calibrate import this_machine
from loom.planner.cost import step_time
from loom.planner.spec import model_from_config
from loom.planner.training import predicted_memory, strategy_for
from loom.train.metrics import read_metrics
from loom.train.offload import OffloadAdamW

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
TIERS = {
    "none": [],
    "optimizer": ["--memory.offload=optimizer"],
    "optimizer + activation": ["--memory.offload=optimizer", "--memory.activation_offload=true"],
    "optimizer + NVMe": [
        "--memory.offload=optimizer",
        "--memory.offload_dir={dir}",
        "--memory.host_budget_gb={budget}",
    ],
}
GB = 1e9
# The peer: DeepSpeed's offload tiers on the same model, batch and steps (random tokens), each in
# its own process under --deepspeed-python; gloo as the process group, its CPU accelerator.
DEEPSPEED_TIERS = {
    "DeepSpeed ZeRO-Offload (stage 2, optimizer on CPU)": {
        "stage": 2,
        "offload_optimizer": {"device": "cpu"},
    },
    "DeepSpeed ZeRO-Infinity (stage 3, optimizer on NVMe)": {
        "stage": 3,
        "offload_optimizer": {"device": "nvme", "nvme_path": "{dir}"},
    },
}


def model_args(a: argparse.Namespace) -> list[str]:
    return [
        "--model.vocab_size=8192",
        f"--model.dim={a.dim}",
        f"--model.n_layers={a.layers}",
        f"--model.n_heads={a.dim // 64}",
        f"--model.n_kv_heads={a.dim // 64}",
        f"--model.ffn_hidden={a.ffn}",
        f"--model.max_seq_len={a.seq}",
        "--model.tie_embeddings=false",
        f"--train.steps={a.steps}",
        f"--train.batch_size={a.batch}",
        f"--train.micro_batch_size={a.batch}",
        f"--train.seq_len={a.seq}",
        "--train.precision=fp32",
        "--train.eval_interval=0",
        "--metrics.log_interval=1",
        "--metrics.progress=plain",
        "--metrics.tensorboard=false",
        "--checkpoint.interval=1000",
    ]


def tier_args(a: argparse.Namespace, tier: str, offload_dir: Path) -> list[str]:
    return [*model_args(a), *(x.format(dir=offload_dir, budget=a.budget) for x in TIERS[tier])]


def train_once(
    a: argparse.Namespace, data: Path, root: Path, tier: str, repeat: int
) -> tuple[float, float]:
    """Peak RSS (bytes, its own VmHWM at the last step, before the last checkpoint) and the median
    step seconds after the first `a.warmup` steps of one `loom train` process."""
    run_dir = root / f"{tier.replace(' ', '')}-{repeat}"
    cmd = [sys.executable, "-m", "loom.cli", "train", str(CONFIG), f"--data.path={data}"]
    cmd += [f"--run_dir={run_dir}", *tier_args(a, tier, root / f"tier-{repeat}")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{tier} failed:\n{done.stderr[-3000:]}")
    records = read_metrics(run_dir)
    tokens = a.batch * a.seq
    seconds = statistics.median(tokens / r["tokens_per_s"] for r in records[a.warmup :])
    return records[-1]["peak_mem_gib"] * 2**30, seconds


def predicted(a: argparse.Namespace, tier: str, adam_rate: float) -> tuple[float, float, float]:
    """The planner's bytes in memory (device + host: one RAM on a CPU), bytes on disk, and
    step seconds, on this machine's calibrated profile with the measured CPU AdamW rate; the
    NVMe tier's files sit in the page cache here (RAM holds them), so its disk bandwidth is
    the profile's memory bandwidth."""
    cfg = load_config(CONFIG, tier_args(a, tier, Path("tier")))
    dims = resolve(cfg, 1)
    hw = this_machine(1)
    hw = replace(hw, disk_gbps=hw.hbm_gbps, cpu_adam_params_per_s=adam_rate)
    memory = predicted_memory(cfg, dims, hw)
    model = model_from_config(cfg.model, cfg.train.seq_len)
    seconds = step_time(model, hw, strategy_for(cfg, dims)).total
    return memory.total + memory.host, memory.disk, seconds


def deepspeed_child(a: argparse.Namespace, tier: str, offload_dir: str) -> dict[str, float]:
    """In the DeepSpeed interpreter: `a.steps` AdamW steps of the tier's model under
    deepspeed.initialize; the process's peak RSS at the last step and the median step seconds
    after the first `a.warmup`."""
    import deepspeed

    from loom.core.device import process_memory_bytes
    from loom.core.loss import cross_entropy
    from loom.models.llama import build_model

    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_PORT", "29571")
    cfg = load_config(CONFIG, model_args(a))
    torch.manual_seed(0)
    model = build_model(cfg.model, "cpu")
    model.init_weights()
    zero = json.loads(json.dumps(DEEPSPEED_TIERS[tier]).replace("{dir}", offload_dir))
    config = {
        "train_batch_size": a.batch,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
        "zero_optimization": zero,
        "aio": {"block_size": 1 << 20, "queue_depth": 8, "thread_count": 1},
    }
    deepspeed.init_distributed(dist_backend="gloo")
    engine, *_ = deepspeed.initialize(
        model=model, config=config, model_parameters=model.parameters()
    )
    tokens = torch.randint(0, cfg.model.vocab_size, (a.batch, a.seq + 1))
    seconds = []
    for _ in range(a.steps):
        start = time.perf_counter()
        loss = cross_entropy(engine(tokens[:, :-1]), tokens[:, 1:])
        engine.backward(loss)
        engine.step()
        seconds.append(time.perf_counter() - start)
    rss = process_memory_bytes()
    return {"rss": rss, "seconds": statistics.median(seconds[a.warmup :])}


def deepspeed_once(
    a: argparse.Namespace, root: Path, tier: str, repeat: int
) -> tuple[float, float]:
    """`deepspeed_child` in its own process under `a.deepspeed_python`."""
    offload_dir = root / f"ds-{repeat}-{len(tier)}"
    offload_dir.mkdir()
    cmd = [a.deepspeed_python, __file__, *sys.argv[1:], "--deepspeed-child", tier, str(offload_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    if done.returncode != 0:
        sys.exit(f"{tier} failed:\n{done.stderr[-3000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return out["rss"], out["seconds"]


def _child_env() -> dict[str, str]:
    """This venv's torch and Loom for a child under another interpreter."""
    env = dict(os.environ)
    site = next(p for p in sys.path if p.endswith("site-packages"))
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, site, env.get("PYTHONPATH", "")])
    return env


# -- the CPU AdamW step --------------------------------------------------------------------------

WARMUP_ROUNDS = 3
STEPPERS = ("OffloadAdamW", "torch fused", "torch foreach", "DeepSpeedCPUAdam")


def optimizer_steps(numel: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per AdamW step of each optimizer over `numel` fp32 parameters (in 64 tensors),
    the optimizers alternating in each round, after `WARMUP_ROUNDS` dropped (on this VM a
    process's first touches of fresh memory are many times slower than later ones)."""
    shapes = [numel // 64] * 64
    grads = [torch.randn(n) * 1e-3 for n in shapes]
    made: dict[str, torch.optim.Optimizer] = {}
    hyper = {"lr": 1e-4, "betas": (0.9, 0.95), "eps": 1e-8}
    for name in STEPPERS:
        params = [torch.zeros(n, requires_grad=True) for n in shapes]
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        groups = [{"params": params, "weight_decay": 0.1}]
        if name == "OffloadAdamW":
            made[name] = OffloadAdamW(groups, **hyper)  # type: ignore[arg-type]
        elif name == "DeepSpeedCPUAdam":
            try:
                from deepspeed.ops.adam import DeepSpeedCPUAdam
            except ImportError:
                continue
            made[name] = DeepSpeedCPUAdam(groups, adamw_mode=True, **hyper)
        else:
            kernel = {"fused": True} if name == "torch fused" else {"foreach": True}
            made[name] = torch.optim.AdamW(groups, **hyper, **kernel)  # type: ignore[arg-type]
    times: dict[str, list[float]] = {name: [] for name in made}
    for r in range(rounds + WARMUP_ROUNDS):
        order = list(made) if r % 2 else list(reversed(made))
        for name in order:
            start = time.perf_counter()
            made[name].step()
            if r >= WARMUP_ROUNDS:
                times[name].append(time.perf_counter() - start)
    return times


def optimizer_comparison(python: str, numel: int, rounds: int) -> dict[str, list[float]]:
    """`optimizer_steps` in a child process under `python` (one with deepspeed, if given)."""
    cmd = [python, __file__, "--optimizer-child", str(numel), str(rounds)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=_child_env())
    if done.returncode != 0:
        sys.exit(f"optimizer comparison failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="first steps not timed")
    parser.add_argument("--repeats", type=int, default=3, help="processes per tier")
    parser.add_argument("--budget", type=float, default=0.25, help="memory.host_budget_gb")
    parser.add_argument("--rounds", type=int, default=12, help="timed steps per optimizer")
    parser.add_argument("--deepspeed-python", default=sys.executable)
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    parser.add_argument("--optimizer-child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed-child", nargs=2, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.optimizer_child:
        print(json.dumps(optimizer_steps(*a.optimizer_child)))
        return
    if a.deepspeed_child:
        print(json.dumps(deepspeed_child(a, *a.deepspeed_child)), flush=True)
        os._exit(0)  # DeepSpeed's AIO threads now and then abort at interpreter shutdown
    peers = list(DEEPSPEED_TIERS) if _deepspeed_version(a.deepspeed_python) != "?" else []

    cfg = load_config(CONFIG, model_args(a))
    numel = cfg.model.num_params()
    steps = optimizer_comparison(a.deepspeed_python, numel, a.rounds)
    fused = statistics.median(steps["torch fused"])
    adam_rate = numel / statistics.median(steps["OffloadAdamW"])
    print(json.dumps({k: statistics.median(v) for k, v in steps.items()}), flush=True)

    results: dict[str, list[tuple[float, float]]] = {tier: [] for tier in [*TIERS, *peers]}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="loom-memory-tiers-") as tmp:
        root = Path(tmp)
        data = prepare(root)
        for repeat in range(a.repeats):
            order = list(results) if repeat % 2 == 0 else list(reversed(results))
            for tier in order:
                if tier in DEEPSPEED_TIERS:
                    result = deepspeed_once(a, root, tier, repeat)
                else:
                    result = train_once(a, data, root, tier, repeat)
                results[tier].append(result)
                loads.append(os.getloadavg()[0])
                print(tier, repeat, results[tier][-1], flush=True)

    base_rss = statistics.median(rss for rss, _ in results["none"])
    rows = []
    for tier, runs in results.items():
        rss = [r / GB for r, _ in runs]
        secs = [s for _, s in runs]
        if tier in DEEPSPEED_TIERS:
            planner = "| – | – | – |"
        else:
            p_mem, p_disk, p_secs = predicted(a, tier, adam_rate)
            planner = f"| {p_mem / GB:.2f} | {p_disk / GB:.2f} | {p_secs:.2f} |"
        rows.append(
            f"| {tier} | {spread(rss)} | {statistics.median(rss) - base_rss / GB:+.2f} "
            f"| {spread(secs)} {planner}"
        )
    ratio_rows = []
    for name, times in steps.items():
        ratios = [t / f for t, f in zip(times, steps["torch fused"], strict=True)]
        ratio_rows.append(
            f"| {name} | {spread([t * 1e3 for t in times])} "
            f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) |"
        )
    state = 8 * numel / GB
    table = "\n".join(
        [
            f"Model: Llama-style, dim {a.dim}, {a.layers} layers, ffn {a.ffn}, vocab 8192, "
            f"untied: {numel / 1e6:.0f}M parameters, fp32 (AdamW state {state:.2f} GB: exp_avg "
            "and exp_avg_sq; fp32 CPU parameters are their own master weights). Each tier: "
            f"{a.repeats} `loom train` processes of {a.steps} steps at batch {a.batch} × seq "
            f"{a.seq}, the tier order reversed every other repeat. Peak RSS = the process's "
            "own high-water mark (VmHWM) at its last step (before the final checkpoint); "
            "step = median seconds of "
            f"steps {a.warmup + 1} on (this VM is slow at a process's first touches of fresh "
            "memory, so the first steps are not timed). Cells: median (min–max over the "
            "repeats). NVMe: memory.offload_dir in "
            f"a temporary folder on this machine's disk, memory.host_budget_gb={a.budget}; the "
            "files fit in the page cache, so their I/O here is memory copies, not drive reads. "
            "Planner: `predicted_memory` and `step_time` for the same config on this machine's "
            "calibrated profile, given the CPU AdamW rate measured below and the profile's "
            "memory bandwidth as disk bandwidth. On a CPU the device and the host are one RAM: "
            "the planner's device bytes plus its host bytes are the prediction of RSS; the "
            "profile tells it the device is host memory (fp32 weights are their own master, "
            "nothing crosses a link) and what a Loom process holds before its tensors (its "
            "runtime allowance, measured at calibration). The machine "
            "is shared: its 1-minute load average (2 cores) after each process ranged "
            f"{min(loads):.1f}–{max(loads):.1f}, so step times carry other jobs' load; the "
            "peak RSS figures do not."
            + (
                " DeepSpeed rows: the same model (built by Loom's code, fp32), batch and steps "
                "on random tokens under `deepspeed.initialize` (deepspeed "
                + _deepspeed_version(a.deepspeed_python)
                + ", its CPU accelerator, a gloo process group of one), in their own processes "
                "in the same alternating order: ZeRO-Offload is stage 2 with the optimizer "
                "offloaded to the CPU (DeepSpeedCPUAdam), ZeRO-Infinity stage 3 with the "
                "optimizer state in files (libaio, in the same temporary folder); their step "
                "is timed around forward, backward and step, Loom's from its metrics (data "
                "loading included)."
                if peers
                else ""
            ),
            "",
            "| memory | peak RSS GB | vs none GB | step s | planner RAM GB | planner disk GB "
            "| planner step s |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"AdamW step over {numel / 1e6:.0f}M fp32 parameters (64 tensors) in one process, "
            f"optimizers alternating, {a.rounds} rounds after {WARMUP_ROUNDS} warm-up rounds: "
            "milliseconds per step "
            "and the per-round ratio to torch's fused CPU AdamW, median (min–max). "
            + (
                "DeepSpeedCPUAdam (deepspeed "
                + _deepspeed_version(a.deepspeed_python)
                + ", adamw_mode, its CPU accelerator) ran in the same process."
                if "DeepSpeedCPUAdam" in steps
                else "DeepSpeed is not installed in this interpreter: no DeepSpeedCPUAdam row."
            ),
            "",
            "| optimizer | ms per step | ratio to torch fused |",
            "|---|---|---|",
            *ratio_rows,
            "",
            f"torch fused: {fused * 1e3:.0f} ms per step, {numel / fused / 1e9:.2f} G "
            "parameters/s.",
        ]
    )
    print("\n" + table)
    if not a.no_write:
        write_section("memory_tiers", table)


def _deepspeed_version(python: str) -> str:
    cmd = [python, "-c", "import importlib.metadata as m; print(m.version('deepspeed'))"]
    return subprocess.run(cmd, capture_output=True, text=True).stdout.strip() or "?"


if __name__ == "__main__":
    main()
