"""Device selection, shared by training, fine-tuning and the pipeline."""

from __future__ import annotations

import os

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
