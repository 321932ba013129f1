"""Runs independent data tasks: in this process, on local worker processes, or on Ray.

Every task returns a small dict with at least `documents` and `bytes`; progress shows both
as rates. Tasks are pure functions of their arguments and of files they read, so where they
run does not change what they produce. Tasks pass large inputs and outputs as files under the
job's output folder: every worker must see the same filesystem (on a Ray cluster of several
machines, `output.dir` must be on a shared filesystem).

One `Executor` serves all the stages of a job, so local worker processes start once (not once
per stage) and Ray is joined once. It records, per stage, how many tasks ran on how many
workers, and every worker's peak memory, for the manifest.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from types import TracebackType
from typing import Any, Literal

from loom.core.errors import LoomError
from loom.core.log import is_terminal, logger

Result = dict[str, Any]


@dataclass
class ExecutorConfig:
    kind: Literal["local", "ray"] = "local"
    workers: int = 0  # tasks at a time; 0 = one per CPU core (of the Ray cluster on Ray)
    ray_address: str = ""  # "" starts (or joins) a local Ray instance
    dedup_shards: int = 0  # near-dedup tasks, each owning some bands; 0 = one per worker


def worker_count(cfg: ExecutorConfig) -> int:
    return cfg.workers or os.cpu_count() or 1


def validate_executor(cfg: ExecutorConfig) -> None:
    if cfg.kind not in ("local", "ray"):
        raise LoomError(f'executor.kind={cfg.kind!r} must be "local" or "ray"')
    if cfg.workers < 0 or cfg.dedup_shards < 0:
        raise LoomError(
            "executor.workers and executor.dedup_shards must be ≥ 0 (0 = one per CPU core / "
            "one per worker)"
        )


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the
    process that started it)."""
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:  # Linux only
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _call(fn: Callable[[Any], Result], task: Any) -> Result:
    """Run one task and say where it ran and how much memory that worker has needed so far."""
    result = fn(task)
    return {
        **result,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
        "peak_rss_mib": peak_rss_mib(),
    }


class Executor:
    """Runs the stages of one job on the configured engine; use it as a context manager."""

    def __init__(self, cfg: ExecutorConfig) -> None:
        self.cfg = cfg
        self.stages: dict[str, dict[str, Any]] = {}
        self.worker_peak_rss_mib: dict[str, float] = {}
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> Executor:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def run(self, stage: str, fn: Callable[[Any], Result], tasks: Sequence[Any]) -> list[Result]:
        """Results in task order, whatever order the tasks finish in."""
        if not tasks:
            return []
        started = time.perf_counter()
        progress = _StageProgress(stage, len(tasks))
        results: list[Result | None] = [None] * len(tasks)
        try:
            for i, result in self._results(fn, tasks):
                results[i] = result
                progress.advance(result)
        finally:
            progress.close()
        done = [r for r in results if r is not None]
        for r in done:
            self.worker_peak_rss_mib[r["worker"]] = max(
                self.worker_peak_rss_mib.get(r["worker"], 0.0), r["peak_rss_mib"]
            )
        self.stages[stage] = {
            "tasks": len(done),
            "workers": len({r["worker"] for r in done}),
            "seconds": round(time.perf_counter() - started, 3),
        }
        return done

    @property
    def workers(self) -> int:
        """Tasks at a time: what to split work into so that every worker has a share."""
        if self.cfg.kind == "ray" and not self.cfg.workers:
            return int(_ray_module(self.cfg).cluster_resources().get("CPU", 1))
        return worker_count(self.cfg)

    def summary(self) -> dict[str, Any]:
        """Where the stages ran, for the manifest."""
        return {
            "kind": self.cfg.kind,
            "workers": self.workers,
            "stages": self.stages,
            "peak_rss_mib": {
                "driver": round(peak_rss_mib(), 1),
                "workers": {w: round(m, 1) for w, m in sorted(self.worker_peak_rss_mib.items())},
            },
        }

    def _results(
        self, fn: Callable[[Any], Result], tasks: Sequence[Any]
    ) -> Iterator[tuple[int, Result]]:
        if self.cfg.kind == "ray":
            yield from _ray(fn, tasks, self.cfg, self.workers)
        elif worker_count(self.cfg) == 1 or len(tasks) == 1:
            for i, task in enumerate(tasks):
                yield i, _call(fn, task)
        else:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    worker_count(self.cfg), mp_context=get_context("spawn")
                )
            futures: dict[Future[Result], int] = {
                self._pool.submit(_call, fn, task): i for i, task in enumerate(tasks)
            }
            for future in as_completed(futures):
                yield futures[future], future.result()


def _ray_module(cfg: ExecutorConfig) -> Any:
    """Ray, joined (or started) once per process."""
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
    return ray


def _ray(
    fn: Callable[[Any], Result], tasks: Sequence[Any], cfg: ExecutorConfig, workers: int
) -> Iterator[tuple[int, Result]]:
    """At most `workers` tasks in flight, so that executor.workers means the same on a cluster
    as on local processes."""
    ray = _ray_module(cfg)
    # SPREAD: independent tasks go to every node, not first to fill the driver's own.
    remote = ray.remote(_call).options(scheduling_strategy="SPREAD")
    waiting = iter(enumerate(tasks))
    pending: dict[Any, int] = {}
    while True:
        for i, task in waiting:
            pending[remote.remote(fn, task)] = i
            if len(pending) == workers:
                break
        if not pending:
            return
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
