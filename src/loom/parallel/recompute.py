"""Activation recomputation: trade compute for the memory of activations kept for backward.

`full` keeps only each wrapped block's input and recomputes the block in backward. `selective`
keeps the outputs of the expensive ops (matmuls and attention) and recomputes the cheap ones
(norms, activations, rotary embeddings, residual adds), which costs a few percent of compute.
`every` applies either to every k-th block only (blocks 0, k, 2k, ...).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from loom.models.llama import Transformer

# Ops whose outputs `selective` keeps: matmuls and attention (CPU and CUDA kernels).
SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


_region = threading.local()


@contextmanager
def recomputed_whole() -> Iterator[None]:
    """Ops run inside are recomputed by `selective`, matmuls too: an attention kernel written
    as many small matmuls (ring attention's score tiles) would otherwise keep every tile, the
    whole [queries × keys] score matrix that attention kernels exist not to keep. (Megatron's
    selective recomputation recomputes the attention core the same way.)"""
    _region.depth = getattr(_region, "depth", 0) + 1
    try:
        yield
    finally:
        _region.depth -= 1


def _keep_expensive(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    if op in SAVED_OPS and not getattr(_region, "depth", 0):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts() -> object:
    return create_selective_checkpoint_contexts(_keep_expensive)


def apply_recompute(model: Transformer, mode: str, every: int = 1) -> None:
    """Wrap blocks of `model` in place; parameter names are unchanged in checkpoints."""
    if mode == "none":
        return
    for key, block in model.layers.items():
        if int(key) % every:
            continue
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(
                block, preserve_rng_state=False, context_fn=_selective_contexts
            )
        model.layers[key] = wrapped


def clean_name(name: str) -> str:
    """A parameter name as in the plain model (without wrapper prefixes)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
