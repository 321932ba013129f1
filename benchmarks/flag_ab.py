"""What benchmarks of one `loom serve` flag share: servers with and without it, alternated
(on, off, off, on, ...), each phase's /metrics deltas and the CPU other processes used
meanwhile (the machine is shared), and the spread of on/off ratios."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from serve_load import Server, loom_server, machine_busy, process_cpu


def alternate(repeats: int, run: Callable[[bool, Path], dict[str, Any]]) -> dict[bool, list[Any]]:
    """`run(on, log)` `repeats` times in each mode, in the order on, off, off, on, ..."""
    order: list[bool] = []
    for r in range(repeats):
        order += [True, False] if r % 2 == 0 else [False, True]
    runs: dict[bool, list[Any]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i, on in enumerate(order):
            runs[on].append(run(on, Path(tmp) / f"serve-{i}.log"))
            shown = {
                k: {m: round(v, 3) for m, v in w.items() if isinstance(v, float)}
                for k, w in runs[on][-1].items()
            }
            print(f"{'on' if on else 'off'}: {shown}", flush=True)
    return runs


class Phase:
    """A phase against a server: its wall time, its /metrics deltas, and the cores other
    processes kept busy meanwhile."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.pid = server.proc.pid if server.proc is not None else None
        self.before = server.metrics()
        self._busy, self._served = machine_busy(), process_cpu(self.pid)
        self._own, self._began = time.process_time(), time.perf_counter()
        self.wall = self.other_cpu = 0.0
        self.after: dict[str, float] = {}

    def end(self) -> None:
        self.wall = time.perf_counter() - self._began
        self.after = self.server.metrics()
        others = machine_busy() - self._busy - (process_cpu(self.pid) - self._served)
        self.other_cpu = (others - (time.process_time() - self._own)) / self.wall

    def delta(self, key: str) -> float:
        return self.after.get(key, 0.0) - self.before.get(key, 0.0)

    def ratio(self, part: str, whole: str) -> float:
        total = self.delta(whole)
        return self.delta(part) / total if total else 0.0


@contextmanager
def serving(gguf: Path, log: Path, flags: list[str]) -> Iterator[Server]:
    server = loom_server(gguf, "fp32", log, None, tuple(flags))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}× ({min(values):.2f}–{max(values):.2f})"
