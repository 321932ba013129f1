"""What a run says while it trains: the progress bar or log lines, and the goodput summary."""

from __future__ import annotations

from typing import Any

from loom.core.log import is_terminal, logger


def log_goodput(g: dict[str, float | int]) -> None:
    logger.info(
        "goodput %.1f%% of %.0f s (productive %.0f s; lost: restarts %d / %.0f s, recomputed "
        "%d steps / %.0f s, checkpoints %.1f s, set-up %.0f s, other %.0f s; %d skipped steps, "
        "%d rollbacks)",
        100 * g["goodput"],
        g["wall_s"],
        g["productive_s"],
        g["restarts"],
        g["restarts_s"],
        g["recomputed_steps"],
        g["recomputed_s"],
        g["checkpoint_s"],
        g["setup_s"],
        g["other_s"],
        g["skipped_steps"],
        g["rollbacks"],
    )


class Progress:
    """A rich progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, mode: str, start: int, total: int) -> None:
        self.off = mode == "off"  # ranks other than 0 say nothing
        self.rich = mode == "rich" or (mode == "auto" and is_terminal())
        self._bar = None
        if self.rich:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task("train", total=total, completed=start, status="")
            self._bar.start()

    def update(self, r: dict[str, Any]) -> None:
        status = f"loss {r['loss']:.4f}  {r['tokens_per_s']:,.0f} tok/s  mfu {r['mfu']:.1%}"
        if "val_loss" in r:
            status += f"  val {r['val_loss']:.4f}"
        if self.off:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=r["step"], status=status)
            if "val_loss" in r:
                self._bar.console.log(f"step {r['step']}: val_loss {r['val_loss']:.4f}")
        else:
            logger.info(
                "step %d  loss %.4f  lr %.2e  grad_norm %.3f  %s tok/s  mfu %.1f%%  mem %.2f GiB%s",
                r["step"],
                r["loss"],
                r["lr"],
                r["grad_norm"],
                f"{r['tokens_per_s']:,.0f}",
                100 * r["mfu"],
                r["peak_mem_gib"],
                f"  val_loss {r['val_loss']:.4f}" if "val_loss" in r else "",
            )
            extra = {k: v for k, v in r.items() if k.startswith(("reward_", "val_reward_"))}
            if extra:
                logger.info(
                    "step %d  %s", r["step"], "  ".join(f"{k} {v:.4f}" for k, v in extra.items())
                )

    def rewind(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
