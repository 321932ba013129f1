"""Stragglers: a rank persistently slower than its peers, named in the log and metrics.jsonl.

What is measured. In synchronous training every rank's step takes the same wall time: the
collectives inside the step (FSDP's all-gathers and reduce-scatters, DDP's all-reduce, the
loss and gradient-norm all-reduces) make the fast ranks wait for the slow one. Wall step time
therefore cannot tell the ranks apart; what can is each rank's *own* time, the time it spends
working rather than waiting for its peers:

    own time = data wait (wall time blocked getting the next batch)
             + compute (the step's time outside the data fetch, on the clock below)

On a CPU device the compute clock is the process's CPU time, which does not advance while the
rank is blocked in a gloo collective waiting for a peer, so a rank slow in compute (a busier or
slower core) stands out by the work it does, wherever in the step the collectives fall. On a
GPU the compute clock is wall time (kernel time would need CUDA events on the compute stream,
which is not built), so the waits at the collectives are in it and only a rank slow in its
data wait, or in host work before the step's first collective, stands out there.

Each log interval every rank's mean own time and data wait are gathered with one all-gather;
a rank whose own time is above `resilience.straggler_factor` × the median for
`resilience.straggler_intervals` intervals in a row is a straggler until an interval is not.
With `resilience.straggler_action = "exclude"` on several nodes the trainer then stops every rank
after a checkpoint and the straggler's node leaves the job (see `Trainer._exclude_stragglers`).
"""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from loom.core.log import logger


class StepClock:
    """Adds up one rank's own time and data wait over the steps of a log interval."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = device.type == "cpu"
        self.own_s = 0.0
        self.data_s = 0.0
        self.steps = 0
        self._data_clock = 0.0  # the compute clock's time inside data fetches, this step
        self._start = 0.0

    def compute_clock(self) -> float:
        """CPU time of the process on a CPU device (blocked waits do not count), else wall."""
        return time.process_time() if self.cpu else time.perf_counter()

    def start_step(self) -> None:
        self._data_clock = 0.0
        self._start = self.compute_clock()

    @contextmanager
    def data_wait(self) -> Iterator[None]:
        """Around getting a batch: its wall time is data wait, not compute."""
        wall, clock = time.perf_counter(), self.compute_clock()
        try:
            yield
        finally:
            self.data_s += time.perf_counter() - wall
            self.own_s += time.perf_counter() - wall
            self._data_clock += self.compute_clock() - clock

    def end_step(self) -> float:
        """Close the step; returns its compute (own time less data wait)."""
        compute = self.compute_clock() - self._start - self._data_clock
        self.own_s += compute
        self.steps += 1
        return compute

    def take(self) -> tuple[float, float]:
        """The interval's mean own time and data wait per step; starts the next interval."""
        n = max(self.steps, 1)
        means = (self.own_s / n, self.data_s / n)
        self.own_s = self.data_s = 0.0
        self.steps = 0
        return means


@dataclass
class Verdict:
    """One interval's comparison of the ranks."""

    own_s: list[float]
    data_s: list[float]
    median_s: float
    slowest_rank: int
    slowest_ratio: float
    stragglers: list[int]  # ranks that are stragglers after this interval


@dataclass
class StragglerDetector:
    """Compares the ranks' own times each interval; `factor` × median for `patience` intervals
    in a row makes a straggler (so one slow interval, a checkpoint or a warm-up, does not)."""

    factor: float
    patience: int
    hosts: list[str] = field(default_factory=list)  # by rank, for the log line
    log: bool = True  # rank 0 logs; every rank keeps the same verdicts
    _over: dict[int, int] = field(default_factory=dict)  # rank: slow intervals in a row
    _flagged: set[int] = field(default_factory=set)

    def observe(self, own_s: Sequence[float], data_s: Sequence[float]) -> Verdict:
        """Judge one interval (every rank's mean own time and data wait); logs when a rank
        becomes a straggler and when it recovers."""
        median = statistics.median(own_s)
        ratios = [s / median if median > 0 else 1.0 for s in own_s]
        slowest = max(range(len(own_s)), key=ratios.__getitem__)
        for rank, ratio in enumerate(ratios):
            if ratio > self.factor:
                self._over[rank] = self._over.get(rank, 0) + 1
                if self._over[rank] >= self.patience and rank not in self._flagged:
                    self._flagged.add(rank)
                    self._log("straggler", rank, own_s[rank], median, self._over[rank])
            else:
                if rank in self._flagged:
                    self._flagged.discard(rank)
                    self._log("straggler recovered", rank, own_s[rank], median, 1)
                self._over.pop(rank, None)
        return Verdict(
            list(own_s), list(data_s), median, slowest, ratios[slowest], sorted(self._flagged)
        )

    def host(self, rank: int) -> str:
        return self.hosts[rank] if rank < len(self.hosts) else "?"

    def _log(self, what: str, rank: int, own: float, median: float, intervals: int) -> None:
        if not self.log:
            return
        host = self.host(rank)
        logger.warning(
            "%s: rank %d (host %s) step %.3g s vs median %.3g s over %d interval%s",
            what,
            rank,
            host,
            own,
            median,
            intervals,
            "" if intervals == 1 else "s",
        )


def gather_times(
    own_s: float, data_s: float, device: torch.device
) -> tuple[list[float], list[float]]:
    """Every rank's own time and data wait: one all-gather of 2 floats per rank, on the device
    the process group's backend takes (NCCL needs CUDA tensors, gloo CPU ones)."""
    mine = torch.tensor([own_s, data_s], dtype=torch.float64, device=device)
    everyone = torch.empty(2 * dist.get_world_size(), dtype=torch.float64, device=device)
    dist.all_gather_into_tensor(everyone, mine)  # flat: gloo takes no [world, 2] output
    own, data = everyone.view(-1, 2).cpu().T.tolist()
    return own, data


@dataclass(frozen=True)
class Node:
    """This process's node in a torchrun job: its index in the rendezvous (GROUP_RANK), the
    number of nodes, and the ranks per node (torchrun numbers ranks node by node)."""

    index: int
    count: int
    ranks_per_node: int

    @classmethod
    def of_this_process(cls) -> Node:
        env = os.environ
        return cls(
            int(env.get("GROUP_RANK", "0")),
            int(env.get("GROUP_WORLD_SIZE", "1")),
            int(env.get("LOCAL_WORLD_SIZE", "1")),
        )

    def of_rank(self, rank: int) -> int:
        return rank // self.ranks_per_node


def hostnames() -> list[str]:
    """Each rank's host name (one all-gather of objects, once per run)."""
    names: list[str] = [""] * dist.get_world_size()
    dist.all_gather_object(names, socket.gethostname())
    return names
