"""Hugging Face correspondence: `config.json` fields and parameter names.

Loom's parameter names are HF's without the leading `model.`, so the mapping is a prefix.
Models with QKV bias map to Qwen2 (HF's Llama would also put a bias on o_proj).
"""

from __future__ import annotations

from typing import Any

import torch

from loom.models.llama import ModelConfig

_PREFIX = "model."


def hf_config_dict(cfg: ModelConfig) -> dict[str, Any]:
    """`config.json` content for `transformers` (Llama, or Qwen2 when the model has QKV bias)."""
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
    out = {name if name.startswith("lm_head.") else _PREFIX + name: t for name, t in state.items()}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = state["embed_tokens.weight"]
    return out
