"""Tensor parallelism (Megatron-style) with optional sequence parallelism, applied from outside.

Attention heads and MLP columns are split over the `tp` mesh: q/k/v and gate/up are
column-parallel, o/down row-parallel, so each block costs one all-reduce in forward (or, with
sequence parallelism, an all-gather before and a reduce-scatter after, with norms and residuals
sharded along the sequence). With loss parallelism the output projection keeps the logits
sharded over the vocabulary and the cross-entropy is computed without gathering them.

Latent attention (DeepSeek's MLA) is split by heads at its up-projections; its low-rank
down-projections stay whole on every rank.

A mixture-of-experts layer is not split: each tensor-parallel rank runs it on the block's
whole (gathered) tokens and keeps its own sequence shard of the output, so its weights and
their gradients are the same on every tp rank (expert tensor parallelism is not built).

Tied embeddings (Megatron's way): the embedding is vocabulary-parallel (each rank holds a slice
of the rows), and the same slice is the output projection's: the final norm hands the model a
replicated DTensor, so the model's `F.linear(h, embed_tokens.weight)` gives vocabulary-sharded
logits with no communication.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from loom.models.llama import LatentAttention, Transformer
from loom.models.moe import MoE


def apply_tensor_parallel(
    model: Transformer, mesh: DeviceMesh, sequence_parallel: bool, loss_parallel: bool
) -> None:
    """Shard `model` (a whole model or one pipeline stage) over the 1-D tensor-parallel mesh."""
    residual = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, object] = {}
    if model.embed_tokens is not None:
        top["embed_tokens"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=residual)
    if model.norm is not None:
        if sequence_parallel:
            top["norm"] = SequenceParallel()
        if model.lm_head is not None:
            top["lm_head"] = ColwiseParallel(
                input_layouts=residual,
                output_layouts=Shard(-1) if loss_parallel else Replicate(),
                use_local_output=not loss_parallel,
            )
    parallelize_module(model, mesh, top)
    if model.norm is not None and model.lm_head is None:
        _tie_output(model, mesh, residual, loss_parallel)

    for block in model.layers.values():
        plan: dict[str, object] = {
            "self_attn": PrepareModuleInput(
                # x, cos, sin, kv_cache, mask: only the hidden states are distributed
                input_layouts=(residual, None, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None, None),
            ),
            "self_attn.o_proj": RowwiseParallel(output_layouts=residual),
        }
        attention = block.self_attn
        if isinstance(attention, LatentAttention):
            plan["self_attn"] = PrepareModuleInput(  # plain tensors for the whole projections
                input_layouts=(residual, None, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None, None),
                use_local_output=True,
            )
            _split_latent_attention(attention, mesh, plan)
        else:
            for name in ("q_proj", "k_proj", "v_proj"):
                plan[f"self_attn.{name}"] = ColwiseParallel()
        if isinstance(block.mlp, MoE):
            plan["mlp"] = PrepareModuleInputOutput(
                input_layouts=(residual,),
                desired_input_layouts=(Replicate(),),
                use_local_input=True,
                output_layouts=(Replicate(),),
                desired_output_layouts=(residual,),
                use_local_output=True,
            )
        else:
            plan["mlp"] = PrepareModuleInput(
                input_layouts=(residual,), desired_input_layouts=(Replicate(),)
            )
            plan["mlp.gate_proj"] = ColwiseParallel()
            plan["mlp.up_proj"] = ColwiseParallel()
            plan["mlp.down_proj"] = RowwiseParallel(output_layouts=residual)
        if sequence_parallel:
            plan["input_layernorm"] = SequenceParallel()
            plan["post_attention_layernorm"] = SequenceParallel()
        parallelize_module(block, mesh, plan)


def _split_latent_attention(
    attention: LatentAttention, mesh: DeviceMesh, plan: dict[str, object]
) -> None:
    """Latent attention by heads: the up-projections from the latent vectors (q_b or q, kv_b)
    are column-parallel, the down-projections and their norms stay whole on every rank. Each
    rank's heads use the one rotary key all heads share, so its gradient on a rank covers that
    rank's heads only: it is summed over the tp ranks on its way back into the replicated
    down-projection (the latent part's gradient arrives summed already, through kv_b)."""
    for name in ("q_proj", "q_b_proj", "kv_b_proj"):
        if getattr(attention, name, None) is not None:
            plan[f"self_attn.{name}"] = ColwiseParallel()
    group, latent = mesh.get_group(), attention.kv_b_proj.in_features
    attention.kv_a_proj_with_mqa.register_forward_hook(
        lambda module, args, out: _SumGradientTail.apply(out, latent, group)
    )


class _SumGradientTail(torch.autograd.Function):
    """Identity; in backward the gradient's last-dimension columns from `start` on are summed
    over `group`."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, start: int, group: Any) -> torch.Tensor:
        ctx.start, ctx.group = start, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        grad = grad.clone()
        tail = grad[..., ctx.start :].contiguous()
        dist.all_reduce(tail, group=ctx.group)
        grad[..., ctx.start :] = tail
        return grad, None, None


def _tie_output(model: Transformer, mesh: DeviceMesh, residual: Any, loss_parallel: bool) -> None:
    """The tied output projection: the normed hidden states as a replicated DTensor, so that
    the product with the vocabulary-sharded embedding is vocabulary-sharded logits; gathered
    into plain logits unless the loss is vocabulary-parallel."""
    gathered = PrepareModuleOutput(
        output_layouts=(residual,), desired_output_layouts=(Replicate(),), use_local_output=False
    )
    parallelize_module(model, mesh, {"norm": gathered})
    if not loss_parallel:
        model.register_forward_hook(_gathered_logits)


def _gathered_logits(module: nn.Module, args: Any, logits: Any) -> Any:
    if isinstance(logits, DTensor):
        return logits.redistribute(placements=[Replicate()]).to_local()
    return logits
