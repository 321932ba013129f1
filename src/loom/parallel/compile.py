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

Logits = Callable[..., torch.Tensor]  # a model: tokens (, doc_ids=...) -> logits
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # logits, targets -> loss
# tokens, targets, doc_ids (packed documents, or None) -> loss
ForwardLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def forward_loss(model: Logits, loss_fn: LossFn) -> ForwardLoss:
    """inputs, targets, doc_ids -> loss, in eager mode."""

    def run(
        inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if doc_ids is None:
            return loss_fn(model(inputs), targets)
        return loss_fn(model(inputs, doc_ids=doc_ids), targets)

    return run


def compile_forward_loss(model: Logits, loss_fn: LossFn) -> ForwardLoss:
    return torch.compile(forward_loss(model, loss_fn))
