"""Hugging Face correspondence: `config.json` fields and parameter names.

Loom's parameter names are HF's without the leading `model.`, so the mapping is a prefix.
Models with QKV bias map to Qwen2 (HF's Llama would also put a bias on o_proj).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loom.core.errors import LoomError, read_json
from loom.core.model_config import MoEConfig
from loom.models.hf_moe import (
    ARCHITECTURES,
    ExpertStacker,
    hf_moe_fields,
    hf_moe_type,
    loom_moe_name,
    moe_from_hf,
    to_hf_moe,
)
from loom.models.llama import ModelConfig, RopeScaling, Transformer, build_model

_PREFIX = "model."
# HF's class of reward and value models: the decoder with a `score` head in place of lm_head
_SCORED = "ForSequenceClassification"


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """`config.json` content for `transformers`: Llama, Qwen2 when the model has QKV bias,
    Mixtral or Qwen2-MoE for a mixture of experts."""
    if cfg.latent_attention:
        raise LoomError(
            "exporting a latent-attention model (model.kv_lora_rank > 0) to Hugging Face format "
            "is not built; keep Loom's checkpoint format"
        )
    model_type, architecture = (
        ("qwen2", "Qwen2ForCausalLM") if cfg.qkv_bias else ("llama", "LlamaForCausalLM")
    )
    config: dict[str, Any] = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.attn_head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        config |= {"attention_bias": False, "mlp_bias": False}
    if cfg.moe.enabled:
        config = {k: v for k, v in config.items() if k not in ("attention_bias", "mlp_bias")}
        config |= hf_moe_fields(cfg)
    if cfg.num_labels:  # a reward or value model: HF's sequence-classification class
        config["architectures"] = [config["architectures"][0].replace("ForCausalLM", _SCORED)]
        config["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
        config["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": s.factor,
            "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_seq_len,
        }
    return config


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if cfg.moe.enabled:
        model_type = hf_moe_type(cfg)
        state = {k: v for n, t in state.items() for k, v in to_hf_moe(n, t, model_type).items()}
    out = {name if name.startswith("lm_head.") else _PREFIX + name: t for name, t in state.items()}
    if cfg.num_labels:
        out["score.weight"] = out.pop("lm_head.weight")
    if cfg.tie_embeddings:
        out["lm_head.weight"] = state["embed_tokens.weight"]
    return out


# -- import --------------------------------------------------------------------------------------

SUPPORTED = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    **ARCHITECTURES,
}


def config_from_hf(raw: dict[str, Any], source: str) -> ModelConfig:
    """A ModelConfig from an HF `config.json` of the Llama family; anything Loom's block does
    not compute the same way is refused with the fields that differ."""
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        raise LoomError(
            f"{source}: model_type={model_type!r} is not supported; Loom imports "
            f"{', '.join(sorted(SUPPORTED))} (the Llama family: Llama 2/3, Mistral, Qwen2, "
            "SmolLM; the mixtures of experts Mixtral and Qwen2-MoE)"
        )
    differs = []
    if raw.get("hidden_act", "silu") != "silu":
        differs.append(f"hidden_act={raw['hidden_act']!r} (Loom: silu)")
    if raw.get("mlp_bias"):
        differs.append("mlp_bias=true (Loom: no MLP bias)")
    if model_type == "llama" and raw.get("attention_bias"):
        differs.append("attention_bias=true (Loom's bias is on q/k/v only, as in Qwen2)")
    window = raw.get("sliding_window")
    use_window = raw.get("use_sliding_window", model_type == "mistral")
    if window is not None and use_window and window < raw.get("max_position_embeddings", 0):
        differs.append(f"sliding_window={window} (Loom attends to the whole sequence)")
    # transformers >= 5 writes rope_parameters {rope_type, rope_theta, ...}; older versions
    # rope_theta and rope_scaling at the top level.
    rope = {**(raw.get("rope_scaling") or {}), **(raw.get("rope_parameters") or {})}
    rope_theta = rope.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = rope if rope_type == "llama3" else None
    if rope_type not in ("llama3", "default"):
        differs.append(f"rope_scaling.rope_type={rope_type!r} (Loom: llama3 or none)")
    if differs:
        raise LoomError(f"{source}: unsupported {model_type} variant: {'; '.join(differs)}")
    num_labels = 0
    if any(_SCORED in name for name in raw.get("architectures") or []):
        num_labels = len(raw.get("id2label") or {}) or int(raw.get("num_labels", 2))
    try:
        if model_type in ARCHITECTURES:
            moe, ffn_hidden = moe_from_hf(raw, source)
        else:
            moe, ffn_hidden = MoEConfig(), int(raw["intermediate_size"])
        heads = int(raw["num_attention_heads"])
        dim = int(raw["hidden_size"])
        cfg = ModelConfig(
            preset=f"hf:{model_type}",
            vocab_size=int(raw["vocab_size"]),
            dim=dim,
            n_layers=int(raw["num_hidden_layers"]),
            n_heads=heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or 0) if raw.get("head_dim") != dim // heads else 0,
            ffn_hidden=ffn_hidden,
            max_seq_len=int(raw.get("max_position_embeddings", 2048)),
            norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=_rope_scaling(scaling) if scaling is not None else None,
            qkv_bias=model_type in ("qwen2", "qwen2_moe"),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)) and not num_labels,
            init_std=float(raw.get("initializer_range", 0.02)),
            moe=moe,
            num_labels=num_labels,
        )
    except KeyError as e:
        raise LoomError(f"{source}: config.json lacks {e.args[0]}") from None
    return cfg


def _rope_scaling(raw: dict[str, Any]) -> RopeScaling:
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw["low_freq_factor"]),
        high_freq_factor=float(raw["high_freq_factor"]),
        original_max_seq_len=int(raw["original_max_position_embeddings"]),
    )


def loom_name(hf_name: str) -> str:
    """(A sequence-classification model's `score` head is Loom's lm_head.)"""
    return "lm_head.weight" if hf_name == "score.weight" else hf_name.removeprefix(_PREFIX)


def load_hf_model(
    folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    """A Loom model from an HF folder (`config.json` + `*.safetensors`, sharded or not),
    filled tensor by tensor, so host memory holds about one copy of the weights."""
    from safetensors import safe_open

    folder = Path(folder)
    cfg = config_from_hf(read_hf_config(folder), str(folder))
    model = build_model(cfg)  # meta: no memory until each tensor arrives
    params = dict(model.named_parameters())
    expected = set(params)
    loaded: set[str] = set()
    experts = ExpertStacker({name: p.shape for name, p in params.items()})
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 -- safe_open is not a dict
                name = loom_moe_name(loom_name(hf_name))
                if "rotary_emb" in name or (cfg.tie_embeddings and name == "lm_head.weight"):
                    continue
                if experts.add(name, f.get_tensor(hf_name), str(file)):
                    continue
                if name not in params:
                    raise LoomError(f"{file}: unexpected tensor {hf_name} for a {cfg.preset} model")
                tensor = f.get_tensor(hf_name)
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise LoomError(
                        f"{file}: {hf_name} has shape {list(tensor.shape)}, but config.json "
                        f"implies {list(params[name].shape)}"
                    )
                set_parameter(model, name, tensor.to(device=device, dtype=dtype))
                loaded.add(name)
    for name, tensor in experts.complete().items():
        set_parameter(model, name, tensor.to(device=device, dtype=dtype))
        loaded.add(name)
    missing = sorted(expected - loaded)
    if missing:
        raise LoomError(
            f"{folder}: {len(missing)} weight(s) missing from the safetensors files, e.g. "
            f"{', '.join(missing[:3])}"
        )
    materialize_buffers(model, device)
    return model


def set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Put `value` in place of the (meta) parameter `name`: an import fills a model built on
    the meta device one tensor at a time."""
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    setattr(module, attr, nn.Parameter(value, requires_grad=True))


def materialize_buffers(model: Transformer, device: torch.device | str) -> None:
    """The buffers of a model whose weights were filled by `set_parameter`: the rotary tables
    computed, the rest (an MoE router's balance bias and counts) zero."""
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, torch.zeros_like(buffer, device=device))
    model.init_buffers()


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise LoomError(f"{folder} is not a Hugging Face model folder (no config.json)")
    raw = read_json(path, "model config")
    if not isinstance(raw, dict):
        raise LoomError(f"{path} must hold a JSON object")
    return raw


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: those its index lists (all must exist), or the one
    `model.safetensors`."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise LoomError(
                f"{folder}: {len(missing)} of {len(names)} weight shards listed in {index.name} "
                f"are missing: {', '.join(missing)}"
            )
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if not single.is_file():
        raise LoomError(f"{folder} has no model.safetensors (or an index of shards)")
    return [single]
