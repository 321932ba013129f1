"""`loom train CONFIG --nproc N`: start N local workers through torchrun's elastic agent.

Each worker runs `python -m loom.train CONFIG ...`, the same entry point a multi-node
`torchrun --nnodes ...` launch uses. When a worker fails, the agent stops the others and this
module turns its report into one error naming the rank, what happened and the step it was in
(read from the `.ranks/` notes the trainer keeps in the run folder).
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import uuid
from pathlib import Path

from loom.errors import LoomError
from loom.log import logger

RANKS_DIR = ".ranks"


def launch(config: str | None, overrides: list[str], nproc: int, run_dir: Path) -> None:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    shutil.rmtree(run_dir / RANKS_DIR, ignore_errors=True)  # notes of an earlier launch
    options: dict[str, object] = {
        "min_nodes": 1,
        "max_nodes": 1,
        "nproc_per_node": nproc,
        "run_id": f"loom-{uuid.uuid4().hex[:8]}",
        "rdzv_backend": "c10d",
        "rdzv_endpoint": "localhost:0",
        "max_restarts": 0,
        "monitor_interval": 0.5,
    }
    launch_config = LaunchConfig(**options)
    args = ["-m", "loom.train", *([config] if config else []), *overrides]
    logger.info("launching %d workers: %s %s", nproc, sys.executable, " ".join(args))
    try:
        elastic_launch(launch_config, entrypoint=sys.executable)(*args)
    except ChildFailedError as e:
        raise LoomError(describe_failures(e, run_dir)) from None


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
    message = failure.message  # type: ignore[attr-defined]
    if isinstance(message, dict):  # the JSON a worker's ErrorHandler wrote
        message = message.get("message", "")
    if isinstance(message, str) and message.startswith(("LoomError: ", "rank ")):
        reason = message.removeprefix("LoomError: ").strip()
        return reason if reason.startswith(f"rank {rank}") else f"rank {rank}: {reason}"
    return f"rank {rank} exited with code {code}{where(run_dir, rank)}"


def where(run_dir: Path, rank: int) -> str:
    try:
        note = json.loads((run_dir / RANKS_DIR / f"rank-{rank}.json").read_text())
    except (OSError, ValueError):
        return " during set-up"
    return f" in step {note['step']}"
