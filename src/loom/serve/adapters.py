"""Several LoRA adapters served over one base model, chosen per request by model name.

The targeted projections become `MultiLoRALinear`: the base matmul runs once for the whole
packed row, then each adapter adds its low-rank update to the rows of the requests that asked
for it. Requests for different adapters (or none) therefore share every batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from loom.core.errors import LoomError
from loom.finetune.adapter import CONFIG_FILE, load_adapter


class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus adapters; `groups` (set per step) says which rows use which."""

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.scalings: list[float] = []
        self.groups: list[tuple[int, torch.Tensor]] = []

    def add(self, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        index = len(self.scalings)
        self.register_buffer(f"lora_A_{index}", a)
        self.register_buffer(f"lora_B_{index}", b)
        self.scalings.append(scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        for index, rows in self.groups:
            a, b = getattr(self, f"lora_A_{index}"), getattr(self, f"lora_B_{index}")
            picked = x[:, rows]
            out[:, rows] += F.linear(F.linear(picked, a), b) * self.scalings[index]
        return out


def _adapter_folder(path: Path) -> Path:
    """A PEFT adapter folder, or a Loom LoRA run's `adapter/` folder."""
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / "adapter" / CONFIG_FILE).is_file():
        return path / "adapter"
    raise LoomError(
        f"--adapter {path}: neither a PEFT adapter folder ({CONFIG_FILE}) nor a Loom LoRA run "
        "with an adapter/ folder"
    )


def attach_adapters(model: nn.Module, adapters: dict[str, str]) -> dict[str, int]:
    """Load each adapter (served name → folder) onto the model; returns name → index."""
    layers: dict[str, MultiLoRALinear] = {}
    names: dict[str, int] = {}
    for index, (name, where) in enumerate(adapters.items()):
        cfg, weights = load_adapter(_adapter_folder(Path(where)))
        targets = {k.removesuffix(".lora_A.weight") for k in weights if k.endswith("lora_A.weight")}
        if not targets:
            raise LoomError(f"--adapter {name}={where} holds no LoRA weights")
        for target in sorted(targets):
            layer = layers.get(target)
            if layer is None:
                try:
                    base = model.get_submodule(target)
                except AttributeError:
                    raise LoomError(
                        f"--adapter {name}={where} adapts {target}, which the model has not"
                    ) from None
                if not isinstance(base, nn.Linear):
                    raise LoomError(f"--adapter {name}: {target} is not a linear layer")
                layer = MultiLoRALinear(base)
                owner, _, attr = target.rpartition(".")
                setattr(model.get_submodule(owner), attr, layer)
                layers[target] = layer
            a, b = weights[f"{target}.lora_A.weight"], weights[f"{target}.lora_B.weight"]
            out_features, in_features = layer.weight.shape
            if a.shape[1] != in_features or b.shape[0] != out_features:
                raise LoomError(
                    f"--adapter {name}={where}: {target} is {tuple(b.shape[:1])}×"
                    f"{tuple(a.shape[1:])}, the model's is {out_features}×{in_features}; "
                    "it was trained on another base model"
                )
            while len(layer.scalings) < index:  # adapters that skip this layer add nothing
                layer.add(a.new_zeros(a.shape), b.new_zeros(b.shape), 0.0)
            layer.add(a.to(layer.weight), b.to(layer.weight), cfg.scaling)
        names[name] = index
    return names


def adapter_layers(model: nn.Module) -> list[MultiLoRALinear]:
    return [m for m in model.modules() if isinstance(m, MultiLoRALinear)]


def select_adapters(layers: list[MultiLoRALinear], adapters: torch.Tensor | None) -> None:
    """Route rows to adapters for the next forward pass (`adapters` [T]: index, -1 for none)."""
    groups: list[tuple[int, torch.Tensor]] = []
    if adapters is not None:
        for index in adapters.unique().tolist():
            if index >= 0:
                groups.append((index, (adapters == index).nonzero().squeeze(1)))
    for layer in layers:
        layer.groups = [(i, rows) for i, rows in groups if i < len(layer.scalings)]
