"""Expert parallelism: each of the `ep` ranks holds experts/ep of every MoE layer's experts, and
tokens travel to their expert's rank and back by all-to-all.

`MoE` hands its experts module every expert's group of this rank's tokens, [experts, capacity,
dim]. Here the groups are padded to the longest capacity on the `ep` group, the groups of rank
r's experts are sent to rank r (one all-to-all), run through the local experts as one batched
matmul, and sent back (a second all-to-all); autograd runs the same exchanges in reverse.

Expert weights are DTensors sharded on dim 0 over the `ep` mesh, so a checkpoint reshards
between ep degrees and one process. FSDP leaves them out (each rank already holds only its own
experts); their gradient, a sum over every rank's tokens, is divided by the data-parallel degree
as FSDP averages the others.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from loom.models.llama import Transformer
from loom.models.moe import Experts, MoE, expert_ffn


class ExpertParallel(nn.Module):
    """A drop-in for `Experts` (same parameter names and whole shapes) holding this rank's
    experts only."""

    def __init__(self, experts: Experts, mesh: DeviceMesh, fixed_capacity: bool = False) -> None:
        super().__init__()
        self.mesh = mesh
        self.fixed_capacity = fixed_capacity  # training groups all as long (capacity_factor)
        for name in ("gate_up_proj", "down_proj"):
            whole = getattr(experts, name)
            shard = distribute_tensor(whole, mesh, [Shard(0)], src_data_rank=None)
            setattr(self, name, nn.Parameter(shard))

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """groups [experts, capacity, dim] of this rank's tokens -> their experts' outputs."""
        ep, group = self.mesh.size(), self.mesh.get_group()
        experts, capacity, dim = groups.shape
        padded = groups
        if not (self.fixed_capacity and self.training):
            longest = torch.tensor(capacity, device=groups.device)
            dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=group)
            padded = F.pad(groups, (0, 0, 0, int(longest) - capacity))
        local = experts // ep
        # chunk r of dim 0 (rank r's experts) goes to rank r; chunk s of the result came from s
        received = _all_to_all(padded, group).reshape(ep, local, -1, dim)
        tokens = received.transpose(0, 1).reshape(local, -1, dim)
        gate_up, down = (
            _MeanGradient.apply(_local(w), ep).to(groups.dtype)
            for w in (self.gate_up_proj, self.down_proj)
        )
        out = expert_ffn(tokens, gate_up, down).reshape(local, ep, -1, dim).transpose(0, 1)
        back = _all_to_all(out.contiguous(), group).reshape(experts, -1, dim)
        return back[:, :capacity]


class _MeanGradient(torch.autograd.Function):
    """Identity; in backward the gradient (summed over every rank's tokens) is divided by the
    ranks, as FSDP averages the gradients of the other parameters."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, ranks: int) -> torch.Tensor:
        ctx.ranks = ranks
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad / ctx.ranks, None


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    out = funcol.all_to_all_single_autograd(x, None, None, group)
    return funcol.wait_tensor(out)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def apply_expert_parallel(model: Transformer, mesh: DeviceMesh) -> set[nn.Parameter]:
    """Split every MoE layer's experts over the 1-D `ep` mesh (on the meta device, before
    FSDP); returns the expert parameters, which FSDP must leave alone."""
    params: set[nn.Parameter] = set()
    for module in model.modules():
        if isinstance(module, MoE) and isinstance(module.experts, Experts):
            fixed = module.cfg.capacity_factor > 0
            module.experts = ExpertParallel(module.experts, mesh, fixed)  # type: ignore[assignment]
            params.update(module.experts.parameters())
    return params
