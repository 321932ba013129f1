"""Surviving faults during training: bad-step guards, the hang watchdog, preemption signals,
the goodput ledger, and fault injection for testing all of them.

Fault injection is off unless the environment variable `LOOM_FAULTS` is set, to a
comma-separated list of `KIND@STEP[-LAST][:rank=R][:attempt=A][:factor=F]`:

    kill        the process SIGKILLs itself at the start of the step
    raise       the step raises a RuntimeError
    nan         the step's loss and gradients become NaN
    hang        the step sleeps forever (the watchdog or the collective timeout ends it)
    checkpoint  the process SIGKILLs itself while the checkpoint of that step is being
                written: its shards are on disk, `latest` has not moved
    slow        from STEP on (to LAST, or to the end) the rank's steps take `factor` times
                their compute: it burns (F - 1) x its last step's compute time in CPU work
                at the start of the step, before the step's collectives, so its peers wait
                for it (a straggler for loom.train.stragglers to find)
    sdc         one bit of the rank's health-check matmul results flips, as silent data
                corruption would: at STEP 0 the pre-flight check's (loom.train.health refuses
                to start, naming the rank), else the check after step STEP (one of
                `resilience.health_interval`'s), which stops the run

By default a fault fires on every rank, only in the first attempt (torchrun's
`TORCHELASTIC_RESTART_COUNT` = 0, so a restarted job runs through), and at most once per step
in a process (a rolled-back run passes the step again without it). Example:
`LOOM_FAULTS="kill@7:rank=1,nan@3,slow@2:rank=1:factor=4,sdc@0:rank=1"`.
"""

from __future__ import annotations

import faulthandler
import math
import os
import re
import signal
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from loom.core.config import ResilienceConfig
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.run_files import GoodputRecord, RunFiles, write_atomic

FAULTS_ENV = "LOOM_FAULTS"
_FOREVER = 2**62  # the last step of a `slow` fault given without -LAST
FAULT_KINDS = ("kill", "raise", "nan", "hang", "checkpoint", "slow", "sdc")
_FAULT = re.compile(
    r"^(?P<kind>[a-z]+)@(?P<first>\d+)(?:-(?P<last>\d+))?(?P<options>(?::\w+=[\w.]+)*)$"
)


def process_start_time() -> float:
    """Wall-clock time this process started (from /proc on Linux; now elsewhere), so that
    interpreter start-up and imports count in the goodput ledger."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # stat field 22: after boot
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - started)
    except (OSError, ValueError, IndexError):
        return time.time()


def restart_attempt() -> int:
    """How many times torchrun has restarted this job (0 in the first attempt)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int
    rank: int | None = None  # None = every rank
    attempt: int = 0
    factor: float = 1.0  # slow: how many times longer the rank's steps take


def parse_faults(text: str) -> list[Fault]:
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        match = _FAULT.match(item)
        if not match or match["kind"] not in FAULT_KINDS:
            raise LoomError(
                f"{FAULTS_ENV}: {item!r} is not KIND@STEP[-LAST][:rank=R][:attempt=A][:factor=F] "
                f"with KIND "
                f"one of {', '.join(FAULT_KINDS)}"
            )
        kind = match["kind"]
        options = dict(o.split("=") for o in match["options"].split(":") if o)
        unknown = set(options) - {"rank", "attempt"} - ({"factor"} if kind == "slow" else set())
        if unknown:
            raise LoomError(f"{FAULTS_ENV}: {item!r}: unknown option {sorted(unknown)[0]}")
        for key in ("rank", "attempt"):
            if not options.get(key, "0").isdigit():
                raise LoomError(f"{FAULTS_ENV}: {item!r}: {key} must be a whole number")
        first = int(match["first"])
        last = int(match["last"] or (_FOREVER if kind == "slow" else first))
        faults.append(
            Fault(
                kind,
                first,
                last,
                int(options["rank"]) if "rank" in options else None,
                int(options.get("attempt", 0)),
                _slow_factor(item, options) if kind == "slow" else 1.0,
            )
        )
    return faults


def _slow_factor(item: str, options: dict[str, str]) -> float:
    try:
        factor = float(options["factor"])
    except (KeyError, ValueError):
        factor = math.nan
    if not factor > 1:
        raise LoomError(
            f"{FAULTS_ENV}: {item!r}: slow needs :factor=F with F a number greater than 1 "
            "(how many times longer the rank's steps take), e.g. slow@2:rank=1:factor=4"
        )
    return factor


class FaultInjector:
    """The faults `LOOM_FAULTS` asks for, fired at the named steps of this rank and attempt."""

    def __init__(self, rank: int, text: str | None = None) -> None:
        text = os.environ.get(FAULTS_ENV, "") if text is None else text
        attempt = restart_attempt()
        self.faults = [
            f for f in parse_faults(text) if f.attempt == attempt and f.rank in (None, rank)
        ]
        self.rank = rank
        self.fired: set[tuple[str, int]] = set()
        self._slow_logged = False
        if self.faults:
            logger.warning("rank %d: fault injection on: %s", rank, text)

    def due(self, kind: str, step: int) -> bool:
        """Whether a `kind` fault fires at `step` (once per step and process)."""
        if (kind, step) in self.fired:
            return False
        if any(f.kind == kind and f.first <= step <= f.last for f in self.faults):
            self.fired.add((kind, step))
            logger.warning("rank %d: injecting %s at step %d", self.rank, kind, step)
            return True
        return False

    def at_step_start(self, step: int) -> None:
        if self.due("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.due("raise", step):
            raise RuntimeError(f"injected failure at step {step}")
        if self.due("hang", step):
            while True:
                time.sleep(3600)

    def slow_down(self, step: int, compute_s: float, clock: Callable[[], float]) -> float:
        """Under a `slow` fault: busy work for (factor - 1) x `compute_s` on `clock` (the
        straggler clock: CPU time on a CPU device), like a slower chip, before the step's
        collectives. Returns the time spent, which the caller leaves out of `compute_s`."""
        factor = max(
            (f.factor for f in self.faults if f.kind == "slow" and f.first <= step <= f.last),
            default=1.0,
        )
        if factor == 1.0 or compute_s <= 0:
            return 0.0
        if not self._slow_logged:
            self._slow_logged = True
            logger.warning("rank %d: steps %g times slower from step %d", self.rank, factor, step)
        start = clock()
        target = start + (factor - 1) * compute_s
        while clock() < target:  # busy work, not a sleep: the CPU clock must advance
            continue
        return clock() - start

    def in_checkpoint(self, step: int) -> None:
        if self.due("checkpoint", step):
            os.kill(os.getpid(), signal.SIGKILL)


class StepGuard:
    """Decides whether a step's update may be applied: not when its loss or gradient norm is
    not finite, nor (with `spike_action = "skip"`) when its loss is a spike. Counts them, and
    says when `max_bad_steps` bad steps in a row call for a rollback."""

    def __init__(self, cfg: ResilienceConfig) -> None:
        self.cfg = cfg
        self.window: deque[float] = deque(maxlen=cfg.spike_window)
        self.consecutive = 0
        self.skipped = 0
        self.spikes = 0
        self.rollbacks = 0

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        """The reason to skip this step's update, or None to apply it."""
        reason = None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
        elif (z := self.zscore(loss)) is not None and z > self.cfg.spike_zscore:
            self.spikes += 1
            logger.warning("step %d: loss spike %.4f (z = %.1f)", step, loss, z)
            if self.cfg.spike_action == "skip":
                reason = f"loss spike (z = {z:.1f})"
        if reason is None:
            self.window.append(loss)
            self.consecutive = 0
            return None
        self.skipped += 1
        self.consecutive += 1
        logger.warning(
            "step %d skipped: %s (%d in a row, rollback after %d)",
            step,
            reason,
            self.consecutive,
            self.cfg.max_bad_steps,
        )
        return reason

    def zscore(self, loss: float) -> float | None:
        if not self.cfg.spike_zscore or len(self.window) < max(3, self.window.maxlen // 2):
            return None
        spread = statistics.pstdev(self.window)
        return (loss - statistics.fmean(self.window)) / spread if spread > 0 else None

    @property
    def rollback_due(self) -> bool:
        return self.consecutive >= self.cfg.max_bad_steps

    def rolled_back(self) -> None:
        self.consecutive = 0
        self.rollbacks += 1


class Watchdog:
    """Dumps the Python stacks of every thread to `<run_dir>/hangs/rank-R-attempt-A.txt` and
    exits with code 1 when a step (or checkpoint) outlasts the timeout, so the launcher sees a
    failure and restarts the job instead of waiting forever. It is faulthandler's own C
    thread, so it fires even when Python is stuck inside a collective."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int) -> None:
        self.timeout_s = timeout_s
        self.path = RunFiles(run_dir).hang_dump(rank, restart_attempt())
        self._file: TextIO | None = None

    def arm(self, what: str) -> None:
        if not self.timeout_s:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w")
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{what} took longer than resilience.hang_timeout_s={self.timeout_s:g}\n")
        self._file.flush()
        faulthandler.dump_traceback_later(self.timeout_s, exit=True, file=self._file)

    def disarm(self) -> None:
        if self._file is not None:
            faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        """Stop watching; leave no file behind when nothing hung."""
        if self._file is not None:
            self.disarm()
            self._file.close()
            self.path.unlink(missing_ok=True)
            self._file = None


class StopSignal:
    """SIGTERM and SIGINT (preemption, Ctrl-C) set a flag instead of killing the process, so the
    loop can finish its step, save a checkpoint and exit cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, sig: int, _frame: FrameType | None) -> None:
        if self.received is None:
            name = signal.Signals(sig).name
            logger.warning("%s received: finishing the step, then saving a checkpoint", name)
        self.received = sig


@dataclass
class GoodputLedger:
    """Where the wall time of a run went, over all its attempts, kept in `<run_dir>/goodput.json`.

    productive = time in steps that are part of the final history; recomputed = steps done
    again after a restart or rollback; checkpoint = time the loop waited for checkpoints;
    restarts = from the last sign of life of a failed attempt to the first step of the next
    one (including its start-up). Goodput = productive / wall.
    """

    path: Path
    started: float = 0.0  # wall clock of the first attempt's start
    last_seen: float = 0.0
    attempts: int = 0
    high_water: int = 0  # the furthest step any attempt completed
    productive_s: float = 0.0
    recomputed_s: float = 0.0
    recomputed_steps: int = 0
    checkpoint_s: float = 0.0
    setup_s: float = 0.0
    restarts_s: float = 0.0
    skipped_steps: int = 0
    rollbacks: int = 0
    _attempt_start: float = field(default=0.0, repr=False)

    @classmethod
    def open(cls, run_dir: Path, process_start: float) -> GoodputLedger:
        """Continue the ledger of `run_dir` (a new attempt) or start one."""
        path = RunFiles(run_dir).goodput
        ledger = cls(path)
        if path.is_file():
            try:
                saved = GoodputRecord.from_json(path.read_text())
                for key in ledger._state():
                    setattr(ledger, key, getattr(saved, key))
            except (OSError, ValueError, TypeError):
                logger.warning("%s is unreadable; goodput is counted from now", path)
        if not ledger.started:
            ledger.started = process_start
        elif ledger.last_seen:
            ledger.restarts_s += max(0.0, process_start - ledger.last_seen)
        ledger.attempts += 1
        ledger._attempt_start = process_start
        ledger.last_seen = time.time()
        return ledger

    def training_started(self) -> None:
        """End of set-up: the first attempt's is `setup`, a later one's is lost to the restart."""
        now = time.time()
        if self.attempts == 1:
            self.setup_s += now - self._attempt_start
        else:
            self.restarts_s += now - self._attempt_start
        self.last_seen = now

    def step_done(self, step: int, seconds: float) -> None:
        if step <= self.high_water:
            self.recomputed_s += seconds
            self.recomputed_steps += 1
        else:
            self.productive_s += seconds
            self.high_water = step
        self.last_seen = time.time()

    def checkpoint_stall(self, seconds: float) -> None:
        self.checkpoint_s += seconds
        self.last_seen = time.time()

    @property
    def wall_s(self) -> float:
        return max(self.last_seen - self.started, 1e-9)

    @property
    def goodput(self) -> float:
        return self.productive_s / self.wall_s

    def _state(self) -> list[str]:
        """The ledger's own fields, which goodput.json keeps between attempts."""
        return [k for k in self.__dataclass_fields__ if k != "path" and not k.startswith("_")]

    def record(self) -> GoodputRecord:
        return GoodputRecord(
            path=str(self.path),
            **{k: getattr(self, k) for k in self._state()},
            goodput=self.goodput,
            wall_s=self.wall_s,
            restarts=self.attempts - 1,
            other_s=self.wall_s
            - self.productive_s
            - self.restarts_s
            - self.recomputed_s
            - self.checkpoint_s
            - self.setup_s,
        )

    def summary(self) -> dict[str, float | int]:
        return self.record().summary()

    def save(self) -> None:
        write_atomic(self.path, self.record().to_json())
