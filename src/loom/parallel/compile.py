"""torch.compile applied from outside the model.

On one device Loom compiles the forward pass and the loss as one graph, so inductor can fuse
across block boundaries and through the head: the final norm, the output projection's upcast
and the log-softmax over the vocabulary become a few passes instead of many over a
[tokens, vocab] tensor. The model object itself is not wrapped, so parameter names, and with
them checkpoints, stay identical to an eager run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Logits = Callable[[torch.Tensor], torch.Tensor]  # a model: tokens -> logits
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # logits, targets -> loss
ForwardLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # tokens, targets -> loss


def forward_loss(model: Logits, loss_fn: LossFn) -> ForwardLoss:
    """inputs, targets -> loss, in eager mode."""

    def run(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(inputs), targets)

    return run


def compile_forward_loss(model: Logits, loss_fn: LossFn) -> ForwardLoss:
    return torch.compile(forward_loss(model, loss_fn))
