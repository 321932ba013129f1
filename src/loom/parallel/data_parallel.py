"""Data parallelism: FSDP2 (ZeRO-3 sharding), HSDP (replicas of shards) or DDP (replicas).

FSDP shards each block's parameters, gradients and optimizer state over the `dp_shard` mesh
dimension and all-gathers a block's weights just before it runs; with `dp_replicate` > 1 as
well, the shards are replicated (HSDP) and gradients are all-reduced across replicas.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from loom.models.llama import Transformer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def apply_fsdp(
    model: Transformer,
    mesh: DeviceMesh,
    param_dtype: torch.dtype,
    reduce_dtype: torch.dtype,
    reshard_after_forward: bool,
    offload_params: bool,
    ignored: set[nn.Parameter] | None = None,
) -> None:
    """Shard every block, then the rest (embedding, final norm, head) as the root group;
    `ignored` parameters (expert-parallel experts, already split) stay as they are."""
    kwargs: dict[str, object] = {
        "mesh": mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
        "ignored_params": ignored or None,
    }
    if offload_params:
        # Pinned host memory needs an accelerator; on a CPU-only machine use pageable memory.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in model.layers.values():
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root's parameters are used last in forward and first in backward: keep them gathered.
    fully_shard(model, reshard_after_forward=False, **kwargs)


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> None:
    """Replicate the whole model; gradients are all-reduced in buckets during backward."""
    replicate(model, device_mesh=mesh)
