"""`loom train`: pretrain a model from a TOML config, in this process or on N workers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.options import option

DESCRIPTION = "Train from a TOML config; override any key as --section.key=value."
TAKES_OVERRIDES = True


@dataclass
class LaunchOptions:
    """How `loom train` / `loom finetune` start: `[pretrain.launch]` holds the same keys."""

    config: str = option("", positional=True, metavar="CONFIG", help="TOML config file")
    nproc: int | None = option(
        None,
        metavar="N",
        help="launch N worker processes on this machine (the [parallel] layout splits them)",
    )
    max_restarts: int = option(
        0,
        metavar="K",
        help="with --nproc: restart all workers up to K times after a failure; each start "
        "resumes from the newest complete checkpoint",
    )
    nnodes: int = option(
        1,
        metavar="N",
        help="with --nproc: machines in the job; this one hosts the c10d rendezvous at "
        "--rdzv-endpoint, and the command each other machine runs is printed",
    )
    rdzv_endpoint: str = option(
        "", metavar="HOST:PORT", help="with --nnodes above 1: this machine's address for the others"
    )
    overrides: list[str] = option(cli=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.nproc is not None and self.nproc < 1:
            raise LoomError(f"--nproc {self.nproc}: give at least 1 process")
        if self.nnodes < 1 or (
            self.nnodes > 1 and (self.nproc is None or ":" not in self.rdzv_endpoint)
        ):
            raise LoomError(
                f"--nnodes {self.nnodes}: give 1 or more; more than 1 needs --nproc N (workers "
                "per machine) and --rdzv-endpoint HOST:PORT (this machine, reachable by the others)"
            )
        if self.max_restarts < 0:
            raise LoomError(f"--max-restarts {self.max_restarts}: give 0 or more")
        if self.max_restarts and self.nproc is None:
            raise LoomError(
                "--max-restarts needs --nproc N (or torchrun's own --max-restarts); "
                "a single process is restarted by running the command again"
            )


@dataclass
class Options(LaunchOptions):
    simulate: int | None = option(
        None,
        metavar="N",
        help="run one step of one rank of an N-rank job on fake tensors and a fake process "
        "group: its peak memory by category and the bytes of each collective",
    )
    rank: int = option(0, metavar="R", help="with --simulate")
    json: bool = option(False, help="with --simulate: print JSON")


def run(options: Options) -> int:
    from loom.core.config import load_config
    from loom.train.trainer import train

    cfg = load_config(options.config, options.overrides)
    if options.simulate is not None:
        from loom.train.simulate import print_simulation

        print_simulation(cfg, options.simulate, options.rank, options.json)
        return 0
    return launch_or_run(options, cfg, cfg, "loom.train", train)


def launch_or_run(options: LaunchOptions, cfg: Any, layout: Any, module: str, train: Any) -> int:
    """Start `--nproc` workers of `module` (the layout checked against them), or train here."""
    from loom.core import distributed

    if options.nproc is not None:
        from loom.parallel.dims import resolve
        from loom.parallel.launch import Nodes, launch

        if not layout.run_dir:
            raise LoomError(
                'run_dir is not set; add run_dir = "..." to the config or pass --run_dir=DIR'
            )
        resolve(layout, options.nproc * options.nnodes)
        nodes = None
        if options.nnodes > 1:
            nodes = Nodes(
                options.nnodes, options.rdzv_endpoint, f"loom-{Path(layout.run_dir).name}"
            )
            nodes.announce(
                module,
                options.nproc,
                options.max_restarts,
                module,
                options.config,
                options.overrides,
            )
        launch(
            options.config,
            options.overrides,
            options.nproc,
            Path(layout.run_dir),
            options.max_restarts,
            module,
            nodes,
        )
        return 0
    result = train(cfg)
    if distributed.launched_by_torchrun():
        distributed.shutdown()
    if result.stopped_by and os.environ.get("RANK", "0") == "0":
        logger.warning(
            "stopped by %s after step %d with a checkpoint saved; run the same command to continue",
            result.stopped_by,
            result.step,
        )
        return 0
    if result.val_losses:
        last = max(result.val_losses)
        logger.info(
            "done: step %d, val_loss %.4f, run folder %s",
            result.step,
            result.val_losses[last],
            result.run_dir,
        )
    return 0
