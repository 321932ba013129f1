"""GGUF files (llama.cpp's format) of the Llama family into Loom.

The architecture comes from the file's metadata; tensors are dequantized one at a time (the
`gguf` package's own kernels) and llama.cpp's reordering of the q/k rows for its rotary
layout is undone. The tokenizer and chat template are rebuilt from the metadata by
`transformers`' GGUF tokenizer conversion and saved as an ordinary `tokenizer.json`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from loom.core.errors import LoomError
from loom.models.hf import materialize_buffers, set_parameter
from loom.models.llama import ModelConfig, Transformer, build_model

_TOP = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
ARCHITECTURES = ("llama", "qwen2")


def gguf_reader(path: Path) -> Any:
    try:
        import gguf
    except ImportError:
        raise LoomError("reading GGUF files needs the gguf package: pip install gguf") from None
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise LoomError(f"{path} is not a readable GGUF file: {e}") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: Any, source: str) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise LoomError(
            f"{source}: general.architecture={arch!r} is not supported; Loom imports "
            f"{', '.join(ARCHITECTURES)} GGUF files"
        )
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise LoomError(f"{source}: rope_freqs (Llama-3.1-style RoPE scaling) is not supported")

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise LoomError(f"{source}: GGUF metadata lacks {arch}.{key}")
        return value

    heads = int(need("attention.head_count"))
    dim = int(need("embedding_length"))
    head_dim = int(_field(reader, f"{arch}.rope.dimension_count", dim // heads))
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    return ModelConfig(
        preset=f"gguf:{arch}",
        vocab_size=int(_field(reader, f"{arch}.vocab_size", len(tokens))),
        dim=dim,
        n_layers=int(need("block_count")),
        n_heads=heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=0 if head_dim == dim // heads else head_dim,
        ffn_hidden=int(need("feed_forward_length")),
        max_seq_len=int(_field(reader, f"{arch}.context_length", 2048)),
        norm_eps=float(need("attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        qkv_bias="blk.0.attn_q.bias" in names,
        tie_embeddings="output.weight" not in names,
    )


def loom_name(gguf_name: str) -> str | None:
    if gguf_name in _TOP:
        return _TOP[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _BLOCK:
        return f"layers.{parts[1]}.{_BLOCK[parts[2]]}.{parts[3]}"
    return None


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head reordering of q/k rows (it interleaves the two rotary halves)."""
    shape = rows.shape
    return rows.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def load_gguf_model(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Transformer:
    from gguf.quants import dequantize

    path = Path(path)
    reader = gguf_reader(path)
    cfg = config_from_gguf(reader, str(path))
    model = build_model(cfg)
    params = dict(model.named_parameters())
    loaded = set()
    for tensor in reader.tensors:
        name = loom_name(tensor.name)
        if name is None or name not in params:
            raise LoomError(f"{path}: unexpected tensor {tensor.name} for a {cfg.preset} model")
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        values = values.reshape(tuple(params[name].shape))
        if ".q_proj." in name:
            values = _unpermute(values, cfg.n_heads)
        elif ".k_proj." in name:
            values = _unpermute(values, cfg.n_kv_heads)
        if not values.flags.writeable:  # a view of the memory-mapped file (F32 tensors)
            values = values.copy()
        set_parameter(model, name, torch.from_numpy(values).to(device=device, dtype=dtype))
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise LoomError(f"{path}: {len(missing)} weight(s) missing, e.g. {', '.join(missing[:3])}")
    materialize_buffers(model, device)
    return model


def save_gguf_tokenizer(path: Path, out: Path) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) from a GGUF file."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise LoomError(
            "rebuilding a GGUF file's tokenizer needs transformers: pip install transformers"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(str(out))


def q4_blocks(raw: np.ndarray, q4_1: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_0 / Q4_1 rows (uint8 [out, in / 32 × block bytes]) as int4 codes [out, in] in
    0..15, scales and zeros [out, in / 32] with w = (code − 8) · scale + zero. Both formats are
    exactly that: Q4_0 is w = d · (q − 8), Q4_1 is w = d · q + m = d · (q − 8) + (m + 8d)."""
    block = 20 if q4_1 else 18
    raw = raw.reshape(raw.shape[0], -1, block)
    d = raw[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    zeros = np.zeros_like(d)
    if q4_1:
        zeros = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) + 8 * d
    nibbles = raw[..., block - 16 :]
    # Byte j of a block holds element j in its low nibble and element j + 16 in its high one.
    codes = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1).reshape(raw.shape[0], -1)
    return codes, d, zeros


def gguf_int4_codes(
    path: Path, names: set[str] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The Q4_0 / Q4_1 matrices of a GGUF file (those in `names`, Loom parameter names, if
    given) as `q4_blocks` codes, scales and zeros, rows in Loom's order: served as stored, no
    requantization (the fp16 scales are rounded to the kernel's bf16). Other types (Q8_0,
    K-quants) are absent: their blocks are not the int4 kernel's format."""
    from gguf import GGMLQuantizationType

    reader = gguf_reader(path)
    cfg = config_from_gguf(reader, str(path))
    q4 = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1)
    found = {}
    for tensor in reader.tensors:
        name = loom_name(tensor.name)
        if tensor.tensor_type not in q4 or name is None or (names and name not in names):
            continue
        out_features = int(tensor.shape[1])
        raw = np.asarray(tensor.data, dtype=np.uint8).reshape(out_features, -1)
        arrays = q4_blocks(raw, tensor.tensor_type == GGMLQuantizationType.Q4_1)
        if ".q_proj." in name or ".k_proj." in name:  # llama.cpp's rotary row order, undone
            heads = cfg.n_heads if ".q_proj." in name else cfg.n_kv_heads
            arrays = tuple(_unpermute(a, heads) for a in arrays)
        codes, scales, zeros = (torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
        found[name] = (codes, scales, zeros)
    return found
