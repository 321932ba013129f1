"""LoRA adapters in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(hf_base, folder)` loads over the base exported to HF."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from loom.core.errors import LoomError, read_json
from loom.core.lora import LoRAConfig

# PEFT names a Llama's parameter `model.layers.0...` under `base_model.model.`.
PEFT_PREFIX = "base_model.model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def peft_config(cfg: LoRAConfig, base: str) -> dict[str, object]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_adapter(
    folder: Path, weights: dict[str, torch.Tensor], cfg: LoRAConfig, base: str
) -> Path:
    """Write the adapter tensors (Loom names, `...q_proj.lora_A.weight`) in PEFT's layout."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        PEFT_PREFIX + name: t.detach().to("cpu").contiguous()
        for name, t in weights.items()
        if ".lora_" in name
    }
    if not tensors:
        raise LoomError("the model holds no LoRA weights to save")
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(peft_config(cfg, base), indent=2))
    return folder


def load_adapter(folder: Path) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """A PEFT LoRA folder's settings and tensors under Loom names."""
    raw = read_json(folder / CONFIG_FILE, "adapter config")
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise LoomError(f"{folder / CONFIG_FILE} is not a LoRA adapter config")
    unsupported = [k for k in ("use_dora", "use_rslora", "fan_in_fan_out") if raw.get(k)]
    if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        unsupported.append("bias/modules_to_save")
    if unsupported:
        raise LoomError(f"{folder}: adapter options Loom does not apply: {', '.join(unsupported)}")
    targets = raw["target_modules"]
    cfg = LoRAConfig(
        rank=int(raw["r"]),
        alpha=float(raw["lora_alpha"]),
        dropout=float(raw.get("lora_dropout", 0.0)),
        targets=sorted(targets) if isinstance(targets, list) else [targets],
    )
    tensors = load_file(str(folder / WEIGHTS_FILE))
    weights = {}
    for name, tensor in tensors.items():
        if not name.startswith(PEFT_PREFIX):
            raise LoomError(f"{folder / WEIGHTS_FILE}: unexpected tensor {name}")
        weights[name.removeprefix(PEFT_PREFIX).replace(".default.", ".")] = tensor
    return cfg, weights
