"""Model presets as data, each with the parameter count its authors published."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from loom.core.errors import LoomError
from loom.core.model_config import ModelConfig, MoEConfig, RopeScaling


@dataclass(frozen=True)
class Preset:
    config: ModelConfig
    published_params: int | None  # from the model card / released weights; None for our own
    source: str
    published_active_params: int | None = None  # a mixture of experts: per token


_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)


def _llama3(preset: str, **fields: Any) -> ModelConfig:
    """The Llama-3 family's shared choices (vocabulary, 8 KV heads, RoPE base), plus `fields`."""
    shared: dict[str, Any] = {
        "vocab_size": 128256,
        "n_kv_heads": 8,
        "rope_theta": 500000.0,
        "max_seq_len": 8192,
    }
    return ModelConfig(preset=preset, **{**shared, **fields})


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        ModelConfig(
            preset="tiny",
            vocab_size=8192,
            dim=256,
            n_layers=4,
            n_heads=8,
            n_kv_heads=4,
            ffn_hidden=768,
            max_seq_len=1024,
            tie_embeddings=True,
        ),
        None,
        "Loom's CPU test model",
    ),
    "smollm2-135m": Preset(
        ModelConfig(
            preset="smollm2-135m",
            vocab_size=49152,
            dim=576,
            n_layers=30,
            n_heads=9,
            n_kv_heads=3,
            ffn_hidden=1536,
            max_seq_len=8192,
            rope_theta=100000.0,
            tie_embeddings=True,
            init_std=0.041666666666666664,
        ),
        134_515_008,
        "HuggingFaceTB/SmolLM2-135M",
    ),
    "qwen2.5-0.5b": Preset(
        ModelConfig(
            preset="qwen2.5-0.5b",
            vocab_size=151936,
            dim=896,
            n_layers=24,
            n_heads=14,
            n_kv_heads=2,
            ffn_hidden=4864,
            max_seq_len=32768,
            norm_eps=1e-6,
            rope_theta=1000000.0,
            qkv_bias=True,
            tie_embeddings=True,
        ),
        494_032_768,
        "Qwen/Qwen2.5-0.5B",
    ),
    "llama3.2-1b": Preset(
        _llama3(
            "llama3.2-1b",
            dim=2048,
            n_layers=16,
            n_heads=32,
            ffn_hidden=8192,
            max_seq_len=131072,
            rope_scaling=RopeScaling(factor=32.0),
            tie_embeddings=True,
        ),
        1_235_814_400,
        "meta-llama/Llama-3.2-1B",
    ),
    "llama3-8b": Preset(
        _llama3("llama3-8b", dim=4096, n_layers=32, n_heads=32, ffn_hidden=14336),
        8_030_261_248,
        "meta-llama/Meta-Llama-3-8B",
    ),
    "llama3.1-8b": Preset(
        _llama3(
            "llama3.1-8b",
            dim=4096,
            n_layers=32,
            n_heads=32,
            ffn_hidden=14336,
            max_seq_len=131072,
            rope_scaling=_LLAMA31_SCALING,
        ),
        8_030_261_248,
        "meta-llama/Llama-3.1-8B",
    ),
    "llama3-70b": Preset(
        _llama3("llama3-70b", dim=8192, n_layers=80, n_heads=64, ffn_hidden=28672),
        70_553_706_496,
        "meta-llama/Meta-Llama-3-70B",
    ),
    "llama3-405b": Preset(
        _llama3(
            "llama3-405b",
            dim=16384,
            n_layers=126,
            n_heads=128,
            ffn_hidden=53248,
            max_seq_len=131072,
            rope_scaling=_LLAMA31_SCALING,
        ),
        405_853_388_800,
        "meta-llama/Llama-3.1-405B",
    ),
    "tiny-moe": Preset(
        ModelConfig(
            preset="tiny-moe",
            vocab_size=8192,
            dim=256,
            n_layers=4,
            n_heads=8,
            n_kv_heads=4,
            ffn_hidden=768,
            max_seq_len=1024,
            tie_embeddings=True,
            moe=MoEConfig(experts=4, top_k=2, shared_experts=1, expert_ffn_hidden=256),
        ),
        None,
        "Loom's CPU test model with 4 experts, top-2, and a shared expert",
    ),
    "mixtral-8x7b": Preset(
        ModelConfig(
            preset="mixtral-8x7b",
            vocab_size=32000,
            dim=4096,
            n_layers=32,
            n_heads=32,
            n_kv_heads=8,
            ffn_hidden=14336,
            max_seq_len=32768,
            rope_theta=1000000.0,
            moe=MoEConfig(experts=8, top_k=2),
        ),
        46_702_792_704,
        "mistralai/Mixtral-8x7B-v0.1",
        12_900_000_000,  # "12.9B active parameters", as Mistral's announcement rounds it
    ),
    "qwen1.5-moe-a2.7b": Preset(
        ModelConfig(
            preset="qwen1.5-moe-a2.7b",
            vocab_size=151936,
            dim=2048,
            n_layers=24,
            n_heads=16,
            n_kv_heads=16,
            ffn_hidden=5632,
            max_seq_len=8192,
            norm_eps=1e-6,
            rope_theta=1000000.0,
            qkv_bias=True,
            moe=MoEConfig(
                experts=60,
                top_k=4,
                shared_experts=4,
                shared_expert_gate=True,
                expert_ffn_hidden=1408,
                norm_top_k=False,
            ),
        ),
        14_300_000_000,  # "14.3B", as the model card rounds it
        "Qwen/Qwen1.5-MoE-A2.7B",
        2_700_000_000,  # "2.7B activated parameters" (the name's A2.7B)
    ),
    "deepseek-v3": Preset(
        # DeepSeek-V3's shapes (its Hugging Face config): latent attention, 3 dense layers, then
        # 58 layers of 256 routed experts (top 8) beside one shared expert; 4,096-token
        # pre-training sequences (the YaRN extension to 128K and the multi-token-prediction
        # module, 14B more, are left out). The router is Loom's (softmax top-k, bias
        # balancing), not DeepSeek's sigmoid group-limited one: the same weights and FLOPs.
        ModelConfig(
            preset="deepseek-v3",
            vocab_size=129280,
            dim=7168,
            n_layers=61,
            n_heads=128,
            n_kv_heads=128,
            head_dim=192,
            ffn_hidden=18432,
            max_seq_len=4096,
            norm_eps=1e-6,
            q_lora_rank=1536,
            kv_lora_rank=512,
            rope_head_dim=64,
            v_head_dim=128,
            moe=MoEConfig(
                experts=256,
                top_k=8,
                shared_experts=1,
                expert_ffn_hidden=2048,
                first_dense_layers=3,
                balance="bias",
            ),
        ),
        671_000_000_000,  # "671B total parameters" (the technical report, MTP module excluded)
        "deepseek-ai/DeepSeek-V3",
        37_000_000_000,  # "37B activated for each token"
    ),
}


def get_preset(name: str) -> ModelConfig:
    """A fresh copy of a preset's config (callers may modify it)."""
    if name not in PRESETS:
        raise LoomError(
            f"model.preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}"
        )
    return copy.deepcopy(PRESETS[name].config)
