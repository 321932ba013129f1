"""The process group: started from torchrun's environment, with a timeout on every collective,
and small helpers to combine per-rank numbers."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def init_process_group(device: torch.device, timeout_s: float) -> None:
    """Join the job torchrun started (once per process); gloo on CPU, NCCL for CUDA tensors."""
    if dist.is_initialized():
        return
    die_with_launcher()
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def die_with_launcher() -> None:
    """Have Linux kill this worker when the process that started it (torchrun's agent: `loom
    train --nproc`, `loom run`) dies, so a killed launch leaves no worker training on into the
    run folder that the next launch resumes in."""
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() == 1:  # the launcher died before the request was made
        os._exit(1)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()  # without it a rank sometimes aborts at exit and torchrun reports failure
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce(value: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum or max of `value` over all ranks (unchanged on one process)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return value


def per_rank(value: float) -> list[float]:
    """Every rank's `value`, in rank order (`[value]` on one process)."""
    if not dist.is_initialized():
        return [value]
    slots = torch.zeros(world_size(), dtype=torch.float64)
    slots[rank()] = value
    return all_reduce(slots).tolist()


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
