"""`loom convert SRC --out DIR --format hf|loom`: Hugging Face model folders to Loom run folders
and back.

SRC is an HF folder (`config.json` + safetensors + tokenizer files), a GGUF file (llama.cpp's
format, dequantized to `--dtype`), or a Loom run folder or checkpoint. `--format loom` writes a
run folder (`config.toml`, `tokenizer/`, `checkpoints/step-0` with the weights) that
`loom generate` reads and training can start from;
`--format hf` writes `config.json`, `model.safetensors` and the tokenizer files, which
`transformers.AutoModelForCausalLM` and `AutoTokenizer` load offline.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from loom.core.checkpoint import Checkpointer
from loom.core.config import Config, save_config
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.lora import lora_layers, merge_lora
from loom.core.run_files import RunFiles
from loom.core.tokenizer import load_tokenizer, tokenizer_hash
from loom.models.hf import hf_config_dict, to_hf_state_dict
from loom.models.llama import Transformer
from loom.models.sources import load_model

FORMATS = ("hf", "loom")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Tokenizer files an HF folder may carry; all are copied along.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)


def convert(
    src: str | Path, out: str | Path, fmt: str, dtype: str = "fp32", merge: bool = False
) -> Path:
    src, out = Path(src), Path(out)
    if fmt not in FORMATS:
        raise LoomError(f"--format {fmt!r}: use {' or '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise LoomError(f"--dtype {dtype!r}: use {' or '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()):
        raise LoomError(f"--out {out} exists and is not empty; choose a new folder")
    if not src.exists():
        raise LoomError(f"{src} does not exist; give an HF model folder or a Loom run folder")
    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer_dir = load_model(src, DTYPES[dtype], Path(scratch))
        _merge_adapters(model, src, merge)
        out.mkdir(parents=True, exist_ok=True)
        if fmt == "hf":
            write_hf(model, tokenizer_dir, out, dtype)
        else:
            write_loom(model, tokenizer_dir, out, source=str(src))
    logger.info(
        "converted %s (%.1fM parameters) to %s format in %s",
        src,
        model.cfg.num_params() / 1e6,
        fmt,
        out,
    )
    return out


def _merge_adapters(model: Transformer, src: Path, merge: bool) -> None:
    has_adapters = any(True for _ in lora_layers(model))
    if merge and not has_adapters:
        raise LoomError(f"--merge: {src} holds no LoRA adapters; leave --merge out")
    if has_adapters and not merge:
        raise LoomError(
            f"{src} is a LoRA fine-tuning run: pass --merge to fold the adapters into the base "
            f"weights (the adapters alone, in PEFT's layout, are in {src}/adapter)"
        )
    if merge:
        logger.info("merged %d LoRA adapters into the base weights", merge_lora(model))


def write_hf(model: Transformer, tokenizer_dir: Path, out: Path, dtype: str) -> None:
    cfg = model.cfg
    config = hf_config_dict(cfg) | {"torch_dtype": "bfloat16" if dtype == "bf16" else "float32"}
    tokenizer_config = _tokenizer_config(tokenizer_dir)
    for key in ("bos_token", "eos_token", "pad_token"):
        token_id = _token_id(tokenizer_dir, tokenizer_config.get(key))
        if token_id is not None:
            config[f"{key}_id"] = token_id
    if cfg.num_labels and "pad_token_id" not in config and "eos_token_id" in config:
        # transformers' reward models find each row's last token by its padding
        config["pad_token_id"] = config["eos_token_id"]
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = to_hf_state_dict(model.state_dict(), cfg)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight")  # transformers ties it to the embedding itself
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    copy_tokenizer_files(tokenizer_dir, out)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))


def write_loom(model: Transformer, tokenizer_dir: Path, out: Path, source: str) -> None:
    cfg = Config(run_dir=str(out), model=model.cfg)
    files = RunFiles(out)
    save_config(cfg, files.config)
    copy_tokenizer_files(tokenizer_dir, files.tokenizer)
    tokenizer = files.tokenizer / "tokenizer.json"
    state = {
        "model": model.cfg.architecture(),
        "model_preset": model.cfg.preset,
        "tokenizer_hash": tokenizer_hash(load_tokenizer(tokenizer)) if tokenizer.is_file() else "",
        "data": [],
        "loader": {},
        "scheduler": {},
        "tokens_seen": 0,
        "source": source,
    }
    Checkpointer(out, keep=1).save(0, [model], [], state)


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """The tokenizer files of a model folder, and nothing else (not its weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for name in copied:
        shutil.copy(src / name, dst / name)
    if "tokenizer.json" not in copied:
        logger.warning("%s holds no tokenizer.json; the converted model has no tokenizer", src)


def _tokenizer_config(folder: Path) -> dict[str, object]:
    """The folder's tokenizer_config.json, naming the fast tokenizer class if it does not, so
    that `AutoTokenizer` loads tokenizer.json without a model-specific class."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    return config


def _token_id(folder: Path, token: object) -> int | None:
    if isinstance(token, dict):
        token = token.get("content")
    if not isinstance(token, str) or not (folder / "tokenizer.json").is_file():
        return None
    return load_tokenizer(folder / "tokenizer.json").token_to_id(token)
