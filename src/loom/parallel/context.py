"""Context parallelism: each sequence split over the `cp` ranks, attention over all of it.

Each rank takes 2 of the 2·cp equal chunks of every sequence, chunks r and 2·cp − 1 − r, so
that under the causal mask every rank has the same amount of attention work (the first chunks
attend to few keys, the last to many). Norms, projections, MLP and loss run on the rank's own
tokens only, so their activations fall to 1/cp; attention all-gathers the keys and values of the
whole sequence (autograd reduce-scatters their gradients) and masks by global position.

The model is untouched: a `ContextParallel` is the attention hook the model already takes for
its key/value caches (`Transformer.forward(..., kv_cache=, positions=)`), and the rotary tables
are read at the rank's own positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from loom.core.errors import LoomError
from loom.parallel.compile import ForwardLoss, LossFn


class ContextParallel:
    """This rank's share of each sequence, and attention over the whole of it."""

    def __init__(self, mesh: DeviceMesh, seq_len: int) -> None:
        self.group = mesh.get_group()
        ranks, rank = mesh.size(), mesh.get_local_rank()
        self.every_rank = torch.stack([_positions(r, ranks, seq_len) for r in range(ranks)])
        self.positions = self.every_rank[rank]
        self.visible = self.positions[:, None] >= self.every_rank.flatten()[None]
        self.masks: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, ...] -> this rank's [batch, seq / cp, ...]."""
        return x[:, self.positions.to(x.device)]

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q, k, v [batch, heads, seq / cp, head_dim] of this rank's positions -> attention
        of its queries over every rank's keys (in rank order), causal by global position."""
        keys = _gather(k, self.group)
        values = _gather(v, self.group)
        mask = self._mask(q)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)

    def _mask(self, q: torch.Tensor) -> torch.Tensor:
        """The additive mask [this rank's tokens, sequence] in q's dtype, made once and shared
        by every layer (a boolean mask would be turned into a new one in each)."""
        key = (q.device, q.dtype)
        if key not in self.masks:
            blocked = torch.zeros(self.visible.shape, dtype=q.dtype, device=q.device)
            self.masks[key] = blocked.masked_fill_(~self.visible.to(q.device), float("-inf"))
        return self.masks[key]


def _positions(rank: int, ranks: int, seq_len: int) -> torch.Tensor:
    chunk = seq_len // (2 * ranks)
    first, second = rank * chunk, (2 * ranks - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def _gather(x: torch.Tensor, group: torch.distributed.ProcessGroup) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_gather_tensor_autograd(x.contiguous(), 2, group))


def context_parallel_loss(
    model: Callable[..., torch.Tensor], loss_fn: LossFn, context: ContextParallel
) -> ForwardLoss:
    """inputs, targets -> the mean loss over this rank's share of every sequence."""

    def run(
        inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        if doc_ids is not None:
            raise LoomError(
                "parallel.cp does not split packed documents (their masks) yet; "
                "set parallel.cp=1 for packed fine-tuning data"
            )
        positions = context.positions.to(inputs.device)
        logits = model(context.shard(inputs), kv_cache=context, positions=positions)
        return loss_fn(logits, context.shard(targets))

    return run
