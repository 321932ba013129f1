"""Fault tolerance measured on real runs: what a checkpoint blocks, what a failure costs where it
lands, and goodput on two nodes that lose one of them again and again.

Every run is `loom train` of the same model on 2 worker processes (FSDP, dp_shard 2):

1. Checkpoint cost. The same steps with no periodic checkpoint, a sync one every K steps and an
   async one every K steps, `--repeats` rounds in alternating order (none, sync, async, then
   async, sync, none, ...). With a metrics record every step, each periodic checkpoint's
   blocking time is the loop's checkpoint wait in its step and the next (the next commits an
   async save), less the same wait in an ordinary step; it is set against the run's median
   step time. The runs' seconds per step (wall minus set-up, over the steps) against `none`
   add what the background writer takes from training.
2. Where a failure lands. Rank 1 SIGKILLed from outside at the start of the step right after a
   sync checkpoint, or halfway to the next one; twice a run, `--repeats` runs per position,
   alternating. The launcher restarts both workers (`--max-restarts`), which resume from the
   checkpoint. Each kill's cost comes from the run's own `goodput.json`: the restart (from
   the last sign of life to the first step again) plus the steps trained again.
3. Two nodes, node 1 lost `--node-every` seconds after its worker started. Each node is its
   own `loom torchrun` agent (node 0 runs `loom train --nnodes 2 --rdzv-endpoint`, node 1
   the command it prints), in its own session and folder, both on this machine. Node 1's
   agent and worker are SIGKILLed and a new node 1 started `--replace-after` seconds later
   (a spare taking over); node 0's agent restarts its worker and the two meet again. A
   checkpoint every `--checkpoint-minutes`, sync and async, one run each; goodput and its
   parts from `goodput.json`.

    python benchmarks/fault_tolerance.py            # writes fault_tolerance (≈ 20 min)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from report import OtherCpu, write_section  # benchmarks/ is on the path when a script in it runs

from loom.cli import main as loom
from loom.train.metrics import read_metrics

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.toml"
BATCH, SEQ = 8, 256
MODEL = [
    "--model.vocab_size=8192",
    "--model.dim=384",
    "--model.n_layers=6",
    "--model.n_heads=6",
    "--model.n_kv_heads=2",
    "--model.ffn_hidden=1024",
    "--model.max_seq_len=256",
    "--model.tie_embeddings=false",
    f"--train.batch_size={BATCH}",
    f"--train.seq_len={SEQ}",
    "--train.precision=bf16",
    "--train.eval_interval=0",
    "--metrics.log_interval=1",
    "--metrics.progress=plain",
    "--metrics.tensorboard=false",
    "--checkpoint.keep=2",
]
WAIT_S = 900  # a guard against a hang


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


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*MODEL, f"--data.path={data}", f"--run_dir={run_dir}", *extra]


def start(argv: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """`loom ARGV` in a session of its own (so that its process group can be killed)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "loom.cli", *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )


def train(data: Path, run_dir: Path, *extra: str, restarts: int = 0) -> subprocess.Popen[bytes]:
    run_dir.mkdir(parents=True)
    argv = ["train", str(CONFIG), "--nproc", "2", "--max-restarts", str(restarts)]
    return start([*argv, *overrides(data, run_dir, *extra)], run_dir.parent / f"{run_dir.name}.log")


def finish(process: subprocess.Popen[bytes], log: Path) -> None:
    if process.wait(timeout=WAIT_S) != 0:
        sys.exit(f"training failed:\n{log.read_text()[-3000:]}")


def ledger(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "goodput.json").read_text())


def notes(run_dir: Path) -> dict[int, dict[str, int]]:
    """The trainer's rank notes (pid and the step each rank is in)."""
    found = {}
    for path in (run_dir / ".ranks").glob("rank-*.json"):
        with contextlib.suppress(OSError, ValueError):
            found[int(path.stem.split("-")[1])] = json.loads(path.read_text())
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# -- 1. checkpoint cost -----------------------------------------------------------------------


def checkpoint_cost(data: Path, root: Path, steps: int, every: int, repeats: int) -> dict:
    modes = {
        "none": [f"--checkpoint.interval={steps}"],
        "sync": [f"--checkpoint.interval={every}"],
        "async": [f"--checkpoint.interval={every}", "--checkpoint.async=true"],
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
    for round_ in range(repeats):
        for name in modes if round_ % 2 == 0 else reversed(modes):
            run_dir = root / f"cost-{name}-{round_}"
            process = train(data, run_dir, f"--train.steps={steps}", *modes[name])
            finish(process, root / f"{run_dir.name}.log")
            results[name].append(blocking(run_dir, steps, every if name != "none" else 0))
            r = results[name][-1]
            print(
                f"{name} #{round_}: {r['s_per_step']:.3f} s/step, step {r['step_s']:.3f} s, "
                f"blocking {r['blocking_s']:.3f} s per checkpoint"
            )
    return results


def blocking(run_dir: Path, steps: int, every: int) -> dict[str, float]:
    """Per periodic checkpoint: the loop's wait in its step and the next, over an ordinary
    step's; the median step time (tokens over tokens/s of each one-step interval)."""
    records = {r["step"]: r for r in read_metrics(run_dir)}
    waited = {
        s: records[s + 1]["checkpoint_s"] - records[s]["checkpoint_s"] for s in range(1, steps)
    }
    saves = [s for s in range(every, steps - 1, every)] if every else []
    busy = set(saves) | {s + 1 for s in saves}
    ordinary = statistics.median(w for s, w in waited.items() if s not in busy)
    g = ledger(run_dir)
    step_s = statistics.median(
        BATCH * SEQ / records[s]["tokens_per_s"] for s in range(2, steps + 1)
    )
    return {
        "blocking_s": statistics.mean(waited[s] + waited[s + 1] - 2 * ordinary for s in saves)
        if saves
        else 0.0,
        "step_s": step_s,
        "s_per_step": (g["wall_s"] - g["setup_s"]) / steps,
    }


# -- 2. where a failure lands -----------------------------------------------------------------


def kill_position(data: Path, root: Path, every: int, repeats: int) -> dict:
    """Two kills a run: at the start of steps c·K + 1 ("after") or c·K + K/2 + 1 ("halfway")."""
    steps = 4 * every
    positions = {
        "right after a checkpoint": [every + 1, 3 * every + 1],
        "halfway between checkpoints": [every + every // 2 + 1, 3 * every + every // 2 + 1],
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in positions}
    for round_ in range(repeats):
        for name in positions if round_ % 2 == 0 else reversed(positions):
            run_dir = root / f"kill-{len(results[name])}-{name.split()[0]}"
            log = root / f"{run_dir.name}.log"
            process = train(
                data,
                run_dir,
                f"--train.steps={steps}",
                f"--checkpoint.interval={every}",
                restarts=len(positions[name]),
            )
            for step in positions[name]:
                kill_rank_at(run_dir, rank=1, step=step, process=process)
            finish(process, log)
            g = ledger(run_dir)
            kills = len(positions[name])
            results[name].append(
                {
                    "restart_s": g["restarts_s"] / kills,
                    "recomputed_steps": g["recomputed_steps"] / kills,
                    "recomputed_s": g["recomputed_s"] / kills,
                    "lost_s": (g["restarts_s"] + g["recomputed_s"]) / kills,
                    "restarts": g["restarts"],
                }
            )
            print(name, json.dumps(results[name][-1]))
    return results


def kill_rank_at(run_dir: Path, rank: int, step: int, process: subprocess.Popen[bytes]) -> None:
    """SIGKILL `rank`'s worker as soon as its note says it started `step`."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        note = notes(run_dir).get(rank)
        if note and note["step"] >= step and alive(note["pid"]):
            os.kill(note["pid"], signal.SIGKILL)
            return
        if process.poll() is not None:
            sys.exit(f"training ended before step {step}")
        time.sleep(0.02)
    sys.exit(f"rank {rank} never reached step {step}")


# -- 3. two nodes, one lost every N seconds ---------------------------------------------------


def two_nodes(
    data: Path, root: Path, steps: int, every_s: float, replace_after: float, extra: list[str]
) -> dict[str, float]:
    """Node 0 hosts the rendezvous; node 1 is killed `every_s` seconds after its worker
    started and replaced `replace_after` seconds later; the job ends when it reaches `steps`."""
    run_dir = root / "run"
    folders = [root / "node-0", root / "node-1"]
    for folder in folders:
        folder.mkdir(parents=True)
    endpoint = f"127.0.0.1:{free_port()}"
    host = ["train", str(CONFIG), "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", endpoint]
    host += ["--max-restarts", "100", *overrides(data, run_dir, f"--train.steps={steps}", *extra)]
    logs = [folder / "agent.log" for folder in folders]
    node0 = start(host, logs[0], cwd=folders[0])
    joiner = printed_command(logs[0], node0)
    node1 = start(joiner, logs[1], cwd=folders[1])
    began, kills = time.monotonic(), 0
    next_kill: float | None = None  # every_s after node 1's worker (re)started
    try:
        while node0.poll() is None:
            time.sleep(0.05)
            worker = worker_of(node1, run_dir)
            if worker is None:
                continue  # node 1's agent is starting its worker or waiting for node 0
            if next_kill is None:
                next_kill = time.monotonic() + every_s
            if (
                time.monotonic() < next_kill
                or max(n["step"] for n in notes(run_dir).values()) >= steps - 5
            ):
                continue
            os.killpg(node1.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
            node1.wait()
            kills += 1
            time.sleep(replace_after)
            node1 = start(joiner, logs[1], cwd=folders[1])
            next_kill = None
        if node0.returncode != 0 or node1.wait(timeout=WAIT_S) != 0:
            sys.exit(f"a node failed:\n{logs[0].read_text()[-3000:]}")
    finally:
        for agent in (node0, node1):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
    return {**ledger(run_dir), "kills": kills, "elapsed_s": time.monotonic() - began}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def printed_command(log: Path, process: subprocess.Popen[bytes]) -> list[str]:
    """The `loom torchrun ...` command node 0 printed for the other nodes, without `loom`."""
    deadline, marker = time.monotonic() + WAIT_S, "nodes run: "
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if marker in line:
                return shlex.split(line.split(marker, 1)[1])[1:]
        if process.poll() is not None:
            sys.exit(f"node 0 ended:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    sys.exit("node 0 printed no command for the other nodes")


def worker_of(agent: subprocess.Popen[bytes], run_dir: Path) -> int | None:
    """The live worker whose parent is `agent`, from the rank notes; None between attempts."""
    for note in notes(run_dir).values():
        with contextlib.suppress(OSError, IndexError):
            stat = Path(f"/proc/{note['pid']}/stat").read_text().rsplit(")", 1)[1].split()
            if stat[1] == str(agent.pid) and stat[0] not in ("Z", "X"):
                return int(note["pid"])
    return None


# -- the report -------------------------------------------------------------------------------


def spread(values: list[float], fmt: str) -> str:
    """Median and range of the repeats."""
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode and position")
    parser.add_argument("--cost-steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="steps between checkpoints (1, 2)")
    parser.add_argument("--node-steps", type=int, default=240, help="steps of a 2-node run")
    parser.add_argument(
        "--node-every",
        type=float,
        default=45.0,
        help="seconds from a node 1 worker's start to its loss",
    )
    parser.add_argument("--replace-after", type=float, default=5.0, help="seconds to a new node")
    parser.add_argument("--checkpoint-minutes", type=float, default=0.5)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()

    other = OtherCpu()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = prepare(root)
        cost = checkpoint_cost(data, root / "cost", args.cost_steps, args.every, args.repeats)
        kills = kill_position(data, root / "kill", args.every, args.repeats)
        nodes = {}
        for name, extra in {"sync": [], "async": ["--checkpoint.async=true"]}.items():
            interval = [
                f"--checkpoint.interval_minutes={args.checkpoint_minutes}",
                "--checkpoint.interval=1000000",
                *extra,
            ]
            nodes[name] = two_nodes(
                data,
                root / f"nodes-{name}",
                args.node_steps,
                args.node_every,
                args.replace_after,
                interval,
            )
            print(name, json.dumps(nodes[name], indent=1))
    busy = other.stop()
    table = render(args, cost, kills, nodes, busy)
    print("\n" + table)
    if not args.no_write:
        write_section("fault_tolerance", table)


def render(args: argparse.Namespace, cost: dict, kills: dict, nodes: dict, busy: float) -> str:
    none_s = statistics.median(r["s_per_step"] for r in cost["none"])
    cost_rows = []
    for name, runs in cost.items():
        steps = [r["step_s"] for r in runs]
        block = [r["blocking_s"] for r in runs]
        share = [r["blocking_s"] / r["step_s"] for r in runs]
        whole = [r["s_per_step"] for r in runs]
        blocked = (
            "— | —"
            if name == "none"
            else f"{spread(block, '{:.3f}')} | **{spread(share, '{:.1%}')}**"
        )
        cost_rows.append(
            f"| {name} | {spread(steps, '{:.3f}')} | {blocked} | {spread(whole, '{:.3f}')} "
            f"| {spread([w / none_s for w in whole], '{:.3f}×')} |"
        )
    kill_rows = [
        f"| {name} | {2 * len(runs)} | {spread([r['restart_s'] for r in runs], '{:.1f}')} "
        f"| {spread([r['recomputed_steps'] for r in runs], '{:.1f}')} "
        f"| {spread([r['recomputed_s'] for r in runs], '{:.1f}')} "
        f"| **{spread([r['lost_s'] for r in runs], '{:.1f}')}** |"
        for name, runs in kills.items()
    ]
    node_rows = [
        f"| {name} | {g['kills']} | {g['restarts']} | {g['wall_s']:.0f} | {g['productive_s']:.0f} "
        f"| **{g['goodput']:.1%}** | {g['restarts_s']:.0f} | {g['recomputed_steps']} / "
        f"{g['recomputed_s']:.0f} | {g['checkpoint_s']:.1f} | {g['setup_s']:.0f} "
        f"| {g['other_s']:.0f} |"
        for name, g in nodes.items()
    ]
    return "\n".join(
        [
            "Model: 6 layers, dim 384, GQA 6/2, ffn 1024, vocab 8192 (≈ 15M parameters; a "
            f"checkpoint with AdamW state ≈ 0.18 GB), batch {BATCH} × {SEQ}, bf16, FSDP over 2 "
            f"workers. Other processes kept {busy:.2f} cores busy on average during the runs. "
            f"Median (min–max) over {args.repeats} runs, run in alternating order.",
            "",
            f"**Checkpoint cost**: {args.cost_steps} steps, a checkpoint every {args.every} "
            "steps (blocking averaged over each run's periodic checkpoints):",
            "",
            "| checkpoints | step time s | blocking s per checkpoint | blocking / step | "
            "s/step of the run | vs none |",
            "|---|---|---|---|---|---|",
            *cost_rows,
            "",
            f"**Where a failure lands**: rank 1 SIGKILLed twice a run, a sync checkpoint every "
            f"{args.every} steps, {4 * args.every} steps; per kill:",
            "",
            "| kill at the start of the step | kills | restart s | steps trained again | "
            "their s | lost s per kill |",
            "|---|---|---|---|---|---|",
            *kill_rows,
            "",
            f"**Two nodes, node 1 lost {args.node_every:g} s after its worker started**: "
            "2 agents × 1 worker, "
            f"{args.node_steps} steps, a checkpoint every {args.checkpoint_minutes:g} min, node 1 "
            f"SIGKILLed (agent and worker) and a new one started {args.replace_after:g} s later; "
            "one run per mode (seconds):",
            "",
            "| checkpoints | nodes lost | restarts | wall | productive | goodput | lost to "
            "restarts | recomputed steps / s | checkpoint stalls | set-up | other |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *node_rows,
        ]
    )


if __name__ == "__main__":
    main()
