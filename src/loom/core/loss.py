"""The language-modelling loss, shared by pre-training, fine-tuning, the planner's calibration and
the simulator so that every one of them measures the same quantity."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """Mean (or summed) next-token loss over the targets that are not -100, computed in fp32
    whatever the logits' dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)
