"""Where a model comes from: a Hugging Face folder, a GGUF file, or a Loom run folder or
checkpoint (pretrained, fully fine-tuned, or LoRA adapters over a base they name).

`describe` reads only the architecture and the tokenizer (cheap: fine-tuning validates its
data with them before any weight is read); `load_model` reads the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loom.core.checkpoint import (
    STATE_FILE,
    Checkpointer,
    load_model_weights,
    read_state,
    verify,
)
from loom.core.config import model_config
from loom.core.errors import LoomError
from loom.core.lora import LoRAConfig, apply_lora, merge_lora
from loom.core.run_files import RunFiles
from loom.models.gguf import config_from_gguf, gguf_reader, load_gguf_model, save_gguf_tokenizer
from loom.models.hf import config_from_hf, load_hf_model, read_hf_config
from loom.models.llama import ModelConfig, Transformer, build_model


def find_checkpoint(path: str | Path) -> tuple[Path, Path]:
    """The checkpoint a run folder's `latest` names (or a step folder itself), and its run."""
    p = Path(path)
    problem = verify(p)
    if problem is None:
        return p, p.parent.parent
    if (p / STATE_FILE).is_file():
        raise LoomError(
            f"checkpoint {p} is not usable ({problem}); give an older step folder, or the run "
            "folder to use the newest complete one"
        )
    if not RunFiles(p).config.is_file():
        raise LoomError(
            f"{p} is neither a Loom run folder (no config.toml) nor a checkpoint folder"
        )
    found = Checkpointer(p, keep=1).latest()
    if found is None:
        raise LoomError(f"run folder {p} has no complete checkpoint yet; train it first")
    return found, p


def describe(src: Path, scratch: Path) -> tuple[ModelConfig, Path]:
    """The architecture and the folder of tokenizer files (a GGUF's rebuilt in `scratch`)."""
    if not src.exists():
        raise LoomError(f"{src} does not exist; give an HF model folder, a .gguf file or a run")
    if src.suffix == ".gguf":
        cfg = config_from_gguf(gguf_reader(src), str(src))
        save_gguf_tokenizer(src, scratch)
        return cfg, scratch
    if (src / "config.json").is_file():
        return config_from_hf(read_hf_config(src), str(src)), src
    checkpoint, run_dir = find_checkpoint(src)
    return model_config(read_state(checkpoint)["model"]), RunFiles(run_dir).tokenizer


def require_language_model(model: Transformer, src: str | Path, use: str) -> None:
    """Refuse a reward or value model (a score head, no language-model head) for `use`."""
    if model.cfg.num_labels:
        raise LoomError(
            f"{src} is a reward model (a score head of {model.cfg.num_labels} output(s), no "
            f"language-model head), so it cannot {use}; score preference pairs with it: "
            '`loom eval MODEL PAIRS.jsonl` with {"prompt", "chosen", "rejected"} records'
        )


def load_model(
    src: Path, dtype: torch.dtype, scratch: Path, device: torch.device | str = "cpu"
) -> tuple[Transformer, Path]:
    """The model with its weights, and the folder of its tokenizer files."""
    if src.suffix == ".gguf":
        _, tokenizer_dir = describe(src, scratch)
        return load_gguf_model(src, device, dtype), tokenizer_dir
    if (src / "config.json").is_file():
        return load_hf_model(src, device, dtype), src
    checkpoint, run_dir = find_checkpoint(src)
    model = load_checkpoint_model(checkpoint, device, scratch).to(dtype)
    return model, RunFiles(run_dir).tokenizer


def load_checkpoint_model(
    checkpoint: Path, device: torch.device | str, scratch: Path
) -> Transformer:
    """A Loom checkpoint's model; an adapter checkpoint's base is loaded from where its
    state says, with the adapters applied (not merged)."""
    state = read_state(checkpoint)
    finetune = state.get("finetune", {})
    if finetune.get("lora"):
        base_path = Path(finetune["base"])
        if not base_path.exists():
            raise LoomError(
                f"{checkpoint} holds LoRA adapters over {base_path}, which does not exist any "
                "more; restore the base model there"
            )
        model, _ = load_model(base_path, torch.float32, scratch, device)
        merge_lora(model)  # the base may itself be a LoRA run
        apply_lora(model, LoRAConfig(**finetune["lora"]))
        model.to(device)
        load_model_weights(checkpoint, model, trainable_only=True)
        return model
    # The checkpoint's own record of its architecture, not the run's latest config.
    model = build_model(model_config(state["model"]), device)
    model.init_buffers()
    load_model_weights(checkpoint, model)
    return model
