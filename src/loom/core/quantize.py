"""Int8 weight-only quantization (torchao) for serving and evaluation.

Each projection keeps its weight as int8 codes with one scale (and zero point) per output row,
about a quarter of the fp32 bytes. Activations stay in the model's dtype: torchao converts the
codes to that dtype for the matmul and scales its output per row, so the only error is the
rounding of the weights (`loom eval --quantize int8` measures it against fp32; see
BENCHMARKS.md). In eager mode that conversion makes a transient full-size copy of one weight per
call, so the saving is in resident memory, not speed. Meant for inference: weights are frozen.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.lora import LoRALinear

MiB = 2**20


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really holds: a tensor subclass (torchao int8, NF4) is counted by the
    tensors inside it (codes, scales, zero points), not by the dtype it presents."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(inner) for n in names if (inner := getattr(t, n)) is not None)
    return t.numel() * t.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (each shared parameter once), quantized ones by their
    packed storage. `loom.core.lora.base_weight_bytes` knows NF4 only; this counts any
    torchao tensor."""
    return sum(tensor_bytes(p.detach()) for p in model.parameters())


def is_quantized(t: torch.Tensor) -> bool:
    """Whether a weight is stored as a tensor subclass (torchao's int8 or NF4), not plainly."""
    return is_traceable_wrapper_subclass(t)


@torch.no_grad()
def quantize_int8_weight_only(model: nn.Module) -> int:
    """Store every `nn.Linear` weight as int8 with per-row scales (torchao
    `Int8WeightOnlyConfig`), in place; returns how many layers were quantized.

    The embedding stays in its dtype, and so does the output projection of a model with tied
    embeddings: it has no `lm_head` and applies `embed_tokens.weight` through `F.linear`, and
    quantizing that shared weight would also change the embedding lookup. An untied `lm_head` is
    an `nn.Linear` and is quantized. Layers already quantized are left alone.

    LoRA layers are refused rather than skipped: their adapters would stay in full precision over
    a quantized base, a model that was never evaluated; fold them in with `merge_lora` first.
    """
    if any(p.is_meta for p in model.parameters()):
        raise LoomError(
            "cannot quantize a model on the meta device (no weights yet); load or initialise "
            "its weights first"
        )
    lora = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    if lora:
        raise LoomError(
            f"the model holds {len(lora)} LoRA layer(s) (e.g. {lora[0]}); merge the adapters "
            "into the base weights first (loom.core.lora.merge_lora, or loom convert --merge)"
        )
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    targets = {
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not is_quantized(m.weight)
    }
    # A wrapper holding a projection's weight itself (serving's multi-adapter layer) is not an
    # nn.Linear: quantize before wrapping. Name such layers rather than skip them silently.
    others = [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if not isinstance(m, nn.Linear | nn.Embedding)
        and isinstance(weight := getattr(m, "weight", None), torch.Tensor)
        and weight.dim() == 2
        and not is_quantized(weight)
    ]
    if others:
        logger.warning(
            "int8 weight-only: %d layer(s) hold a matrix weight but are not nn.Linear and stay "
            "unquantized (quantize before wrapping them): %s",
            len(others),
            ", ".join(others[:3]) + (", ..." if len(others) > 3 else ""),
        )
    before = weight_bytes(model)
    # set_inductor_config=False: leave torch.compile's process-wide settings as they are.
    quantize_(
        model,
        Int8WeightOnlyConfig(set_inductor_config=False),
        filter_fn=lambda m, name: name in targets,
    )
    after = weight_bytes(model)
    logger.info(
        "int8 weight-only: %d linear layers quantized; weights %.1f MiB -> %.1f MiB",
        len(targets),
        before / MiB,
        after / MiB,
    )
    return len(targets)
