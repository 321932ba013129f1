"""Device selection, shared by training, fine-tuning and the pipeline; a process's memory."""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

import torch

from loom.core.errors import LoomError


def select_device(name: str) -> torch.device:
    """The CPU, or the GPU of this process (torchrun's LOCAL_RANK when launched by it)."""
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LoomError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        if "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def process_memory_bytes(peak: bool = True) -> int:
    """This process's resident memory, its peak or now. On Linux /proc's VmHWM / VmRSS count
    this address space alone; ru_maxrss (the fallback) also keeps the resident size a parent
    had when it forked this process, across exec."""
    status = Path("/proc/self/status")
    if status.exists():
        field = "VmHWM:" if peak else "VmRSS:"
        for line in status.read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # macOS reports bytes
