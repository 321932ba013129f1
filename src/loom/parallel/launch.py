"""`loom train CONFIG --nproc N [--max-restarts K]`: start N local workers through torchrun's
elastic agent, and `loom torchrun ...`, torchrun itself for multi-node launches.

Each worker runs `python -m loom.train CONFIG ...`, the same entry point a multi-node
`torchrun --nnodes ...` launch uses. When a worker fails, the agent stops the others and, up
to K times, starts them all again; each start resumes from the newest complete checkpoint.
When no restart is left, this module turns the agent's report into one error naming the
rank, what happened and the step it was in (read from the `.ranks/` notes the trainer keeps
in the run folder, and the stack dumps of the hang watchdog).

Restarts on gloo fail in torch's default set-up: the restarted workers meet a rendezvous
store that still holds the previous attempt's keys (pytorch issue 135712). Both entry points
therefore turn the store sharing off (`TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`) before the
agent starts.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.run_files import RANKS, RankNote, RunFiles

RESTARTABLE_STORE = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
# A node that stops sending heartbeats leaves the c10d rendezvous after keep_alive_interval x
# keep_alive_max_attempt seconds, and until then the next round cannot complete without it.
# torch's default, 5 s x 3, was most of the restart after a lost node in
# benchmarks/fault_tolerance.py; 2 s x 3 costs each agent one store update every 2 s.
KEEP_ALIVE = {"keep_alive_interval": 2, "keep_alive_max_attempt": 3}


def rdzv_conf(**extra: object) -> str:
    """torchrun's `--rdzv-conf` value for a multi-node job: `extra`, then KEEP_ALIVE."""
    return ",".join(f"{key}={value}" for key, value in (extra | KEEP_ALIVE).items())


def torchrun(args: list[str]) -> int:
    """torchrun with `args`, restartable on gloo."""
    from torch.distributed.elastic.multiprocessing.errors import record
    from torch.distributed.run import get_args_parser, run

    os.environ.update(RESTARTABLE_STORE)
    parser = get_args_parser()
    parser.prog = "loom torchrun"  # argparse would name the program after sys.argv[0]: loom
    record(run)(parser.parse_args(args))  # as torchrun's own main
    return 0


@dataclass(frozen=True)
class Nodes:
    """A job over several machines: this one hosts the c10d rendezvous at `endpoint` (so it
    must be this machine's HOST:PORT) and the others join it with `command_for_others`."""

    count: int
    endpoint: str
    run_id: str

    def command_for_others(
        self,
        nproc: int,
        max_restarts: int,
        module: str,
        config: str,
        overrides: Sequence[str] = (),
    ) -> list[str]:
        """The `loom torchrun` command each other node runs to join the job."""
        return [
            *("loom", "torchrun", "--nnodes", str(self.count), "--nproc-per-node", str(nproc)),
            *("--max-restarts", str(max_restarts), "--rdzv-backend", "c10d"),
            *("--rdzv-endpoint", self.endpoint, "--rdzv-id", self.run_id),
            *("--rdzv-conf", rdzv_conf(is_host=0), "-m", module, config, *overrides),
        ]

    def announce(
        self,
        name: str,
        nproc: int,
        max_restarts: int,
        module: str,
        config: str,
        overrides: Sequence[str] = (),
    ) -> None:
        """Log the command each other node must run (before this one starts waiting)."""
        command = self.command_for_others(nproc, max_restarts, module, config, overrides)
        logger.warning(
            "[%s] trains on %d nodes; this one hosts the rendezvous at %s. On each of the "
            "other %d nodes run: %s",
            name,
            self.count,
            self.endpoint,
            self.count - 1,
            shlex.join(command),
        )


def launch(
    config: str | None,
    overrides: list[str],
    nproc: int,
    run_dir: Path,
    max_restarts: int = 0,
    module: str = "loom.train",
    nodes: Nodes | None = None,
) -> str | None:
    """Start `python -m MODULE CONFIG OVERRIDES` on N local workers (loom.train or
    loom.finetune), alone or as the rendezvous host of `nodes`; the name of the signal that
    stopped them early, or None."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.update(RESTARTABLE_STORE)
    shutil.rmtree(run_dir / RANKS, ignore_errors=True)  # notes of an earlier launch
    options: dict[str, object] = {
        "min_nodes": 1,
        "max_nodes": 1,
        "nproc_per_node": nproc,
        "run_id": f"loom-{uuid.uuid4().hex[:8]}",
        "rdzv_backend": "c10d",
        "rdzv_endpoint": "localhost:0",
        "max_restarts": max_restarts,
        "monitor_interval": 0.5,
    }
    if nodes is not None:
        options |= {"min_nodes": nodes.count, "max_nodes": nodes.count, "run_id": nodes.run_id}
        configs = {"is_host": True, **KEEP_ALIVE}
        options |= {"rdzv_endpoint": nodes.endpoint, "rdzv_configs": configs}
    launch_config = LaunchConfig(**options)
    args = ["-m", module, *([config] if config else []), *overrides]
    logger.info("launching %d workers: %s %s", nproc, sys.executable, " ".join(args))
    try:
        elastic_launch(launch_config, entrypoint=sys.executable)(*args)
    except ChildFailedError as e:
        raise LoomError(describe_failures(e, run_dir)) from None
    except SignalException as e:
        # The workers got the signal too: each finished its step and saved a checkpoint.
        name = signal.Signals(e.sigval).name
        logger.warning(
            "stopped by %s; the workers saved a checkpoint; run the same command to continue",
            name,
        )
        return name
    logger.info("all %d workers finished; run folder %s", nproc, run_dir)
    return None


def describe_failures(error: object, run_dir: Path) -> str:
    """One line: each failed rank, why, and in which step; the cause first (ranks the agent
    stopped with SIGTERM after another failed come last)."""
    failures = getattr(error, "failures", {})
    stopped = [r for r, f in failures.items() if f.exitcode == -signal.SIGTERM]
    order = [r for r in sorted(failures) if r not in stopped] + sorted(stopped)
    return "; ".join(_reason(rank, failures[rank], run_dir) for rank in order)


def _reason(rank: int, failure: object, run_dir: Path) -> str:
    code = failure.exitcode  # type: ignore[attr-defined]
    if code < 0:
        name = failure.signal_name()  # type: ignore[attr-defined]
        return f"rank {rank} was killed by {name}{where(run_dir, rank)}"
    dumps = RunFiles(run_dir).hang_dumps(rank)
    if dumps and "Timeout (" in dumps[-1].read_text(errors="replace"):
        return f"rank {rank} hung{where(run_dir, rank)}; its stacks are in {dumps[-1]}"
    message = failure.message  # type: ignore[attr-defined]
    if isinstance(message, dict):  # the JSON a worker's ErrorHandler wrote
        message = message.get("message", "")
    if isinstance(message, str) and message.startswith(("LoomError: ", "rank ")):
        reason = message.removeprefix("LoomError: ").strip()
        return reason if reason.startswith(f"rank {rank}") else f"rank {rank}: {reason}"
    return f"rank {rank} exited with code {code}{where(run_dir, rank)}"


def where(run_dir: Path, rank: int) -> str:
    try:
        note: RankNote = json.loads(RunFiles(run_dir).rank_note(rank).read_text())
    except (OSError, ValueError):
        return " during set-up"
    return f" in step {note['step']}"
