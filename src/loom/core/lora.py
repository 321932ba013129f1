"""LoRA: a frozen projection plus a trainable low-rank update, W·x + (alpha/rank)·B·A·x.

Applied from outside the model: `apply_lora` swaps the target `nn.Linear`s for `LoRALinear`,
which keeps the base `weight` (and `bias`) under the same names and adds `lora_A` and `lora_B`
beside them, so base checkpoints still load by name and adapter names are PEFT's
(`...q_proj.lora_A.weight`). QLoRA stores the frozen base weights as torchao NF4 tensors
(4-bit NormalFloat with double-quantized block scales) and computes in the activation dtype.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from loom.core.errors import LoomError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(PROJECTIONS))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def validate(self) -> None:
        if self.rank < 1:
            raise LoomError(f"lora.rank={self.rank} must be at least 1")
        if self.alpha <= 0:
            raise LoomError(f"lora.alpha={self.alpha} must be greater than 0")
        if not 0 <= self.dropout < 1:
            raise LoomError(f"lora.dropout={self.dropout} must be in [0, 1)")
        unknown = sorted(set(self.targets) - set(PROJECTIONS))
        if unknown or not self.targets:
            raise LoomError(
                f"lora.targets {unknown or '[]'}: choose among {', '.join(PROJECTIONS)}"
            )


class LoRALinear(nn.Module):
    """A linear layer whose `weight`/`bias` are frozen and whose update is `lora_B @ lora_A`."""

    def __init__(self, base: nn.Linear, cfg: LoRAConfig) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device
        self.lora_A = nn.Linear(self.in_features, cfg.rank, bias=False, device=device)
        self.lora_B = nn.Linear(cfg.rank, self.out_features, bias=False, device=device)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.scaling = cfg.scaling
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_nf4(self.weight):
            # Dequantized block by block for each matmul, forward and backward, so that only
            # the 4-bit copy persists (that is QLoRA's memory saving).
            from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

            out = linear_nf4(x, self.weight)
            out = out + self.bias if self.bias is not None else out
        else:
            out = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return out
        return out + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + scaling·B·A in the base weight's (dequantized) dtype."""
        base = _dequantize(self.weight)
        delta = self.lora_B.weight.float() @ self.lora_A.weight.float()
        return (base.float() + self.scaling * delta).to(base.dtype)


def _is_nf4(t: torch.Tensor) -> bool:
    return type(t).__name__ == "NF4Tensor"


def _dequantize(t: torch.Tensor) -> torch.Tensor:
    return t.get_original_weight() if _is_nf4(t) else t  # type: ignore[attr-defined]


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> int:
    """Freeze every parameter, then wrap the target projections; returns how many."""
    cfg.validate()
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in cfg.targets
    ]
    for name, module in targets:
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, LoRALinear(module, cfg))
    return len(targets)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


@torch.no_grad()
def init_lora_parameter_(name: str, tensor: torch.Tensor, seed: int) -> bool:
    """Initialise an adapter tensor in place (A: uniform ±1/sqrt(fan_in), seeded by name, as
    PEFT's Kaiming default; B: zeros, so training starts from the base model exactly).
    Returns False for a name that is not an adapter's."""
    if name.endswith("lora_B.weight"):
        tensor.zero_()
        return True
    if name.endswith("lora_A.weight"):
        generator = torch.Generator(device=tensor.device)
        generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        bound = 1 / math.sqrt(tensor.shape[1])
        tensor.uniform_(-bound, bound, generator=generator)
        return True
    return False


def quantize_base_nf4(model: nn.Module, device: torch.device, block_size: int = 64) -> int:
    """Store the frozen weights of every LoRA layer as NF4 on `device` (QLoRA), then move the
    rest of `model` there; returns how many weights were quantized.

    The model may sit in host memory: each weight is quantized on its way to the device, so
    the device never holds more than one full-precision projection (a 70B base is 282 GB in
    fp32, 37 GB in NF4). Each block of 64 weights keeps one scale; the scales are quantized to
    int8 in groups of up to 256 (double quantization). A weight whose size is not a multiple
    of 64 stays as it is."""
    from torchao.quantization import NF4Tensor

    count = 0
    for _, layer in lora_layers(model):
        weight = layer.weight.detach()
        if weight.numel() % block_size or _is_nf4(weight):
            continue
        scaler_block = math.gcd(weight.numel() // block_size, 256)
        on_device = weight.to(device).contiguous()
        nf4 = NF4Tensor.from_tensor(on_device, block_size, scaler_block)
        del on_device
        layer.weight = nn.Parameter(nf4, requires_grad=False)
        count += 1
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if not _is_nf4(param):
                param.data = param.data.to(device)
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device))
    return count


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model alone (DPO's reference policy) without a second copy of it."""
    layers = [layer for _, layer in lora_layers(model)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight and put plain `nn.Linear`s back."""
    merged = list(lora_layers(model))
    for name, layer in merged:
        weight = layer.merged_weight()
        linear = nn.Linear(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        linear.weight.copy_(weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, linear)
    return len(merged)


def base_weight_bytes(model: nn.Module) -> int:
    """Bytes held by the base model's weights (NF4 tensors counted by their packed storage)."""
    total = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        if _is_nf4(p):
            inner = [p.quantized_data, p.quantized_scalers, p.quantization_factor, p.scaler_mean]
            total += sum(t.numel() * t.element_size() for t in inner)
        else:
            total += p.numel() * p.element_size()
    return total
