"""Runs independent data tasks: in this process, on local worker processes, or on Ray.

Every task returns a small dict with at least `documents` and `bytes`; progress shows both
as rates. Tasks are pure functions of their arguments, so where they run does not change
what they produce.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any, Literal

from loom.core.errors import LoomError
from loom.core.log import is_terminal, logger

Result = dict[str, Any]


@dataclass
class ExecutorConfig:
    kind: Literal["local", "ray"] = "local"
    workers: int = 0  # 0 = one per CPU core
    ray_address: str = ""  # "" starts (or joins) a local Ray instance


def worker_count(cfg: ExecutorConfig) -> int:
    return cfg.workers or os.cpu_count() or 1


def run_tasks(
    stage: str, fn: Callable[[Any], Result], tasks: Sequence[Any], cfg: ExecutorConfig
) -> list[Result]:
    """Results in task order, whatever order the tasks finish in."""
    if not tasks:
        return []
    progress = _StageProgress(stage, len(tasks))
    results: list[Result | None] = [None] * len(tasks)
    try:
        if cfg.kind == "ray":
            for i, result in _ray(fn, tasks, cfg):
                results[i] = result
                progress.advance(result)
        elif worker_count(cfg) == 1 or len(tasks) == 1:
            for i, task in enumerate(tasks):
                results[i] = fn(task)
                progress.advance(results[i])
        else:
            workers = min(worker_count(cfg), len(tasks))
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(fn, task): i for i, task in enumerate(tasks)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    progress.advance(future.result())
    finally:
        progress.close()
    return [r for r in results if r is not None]


def _ray(fn: Callable[[Any], Result], tasks: Sequence[Any], cfg: ExecutorConfig):
    try:
        import ray
    except ImportError:
        raise LoomError("executor.kind = \"ray\" needs Ray: pip install 'loom[ray]'") from None
    if not ray.is_initialized():
        ray.init(
            address=cfg.ray_address or None,
            num_cpus=None if cfg.ray_address else worker_count(cfg),
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    remote = ray.remote(fn)
    pending = {remote.remote(task): i for i, task in enumerate(tasks)}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            yield pending.pop(ref), ray.get(ref)


class _StageProgress:
    """Documents/s and bytes/s of a stage: a rich bar on a terminal, a log line otherwise."""

    def __init__(self, stage: str, total: int) -> None:
        self.stage, self.start = stage, time.perf_counter()
        self.documents = self.bytes = 0
        self._bar = None
        if is_terminal():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn(f"[bold]{stage}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task(stage, total=total, rate="")
            self._bar.start()

    def advance(self, result: Result) -> None:
        self.documents += int(result.get("documents", 0))
        self.bytes += int(result.get("bytes", 0))
        if self._bar is not None:
            self._bar.update(self._task, advance=1, rate=self._rate())

    def _rate(self) -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return f"{self.documents / seconds:,.0f} docs/s  {self.bytes / seconds / 1e6:,.2f} MB/s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        logger.info(
            "%s: %d documents, %.1f MB (%s)",
            self.stage,
            self.documents,
            self.bytes / 1e6,
            self._rate(),
        )
