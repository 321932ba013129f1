"""Autoregressive sampling with a key/value cache: temperature, top-k and top-p."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from loom.core.errors import LoomError
from loom.core.run_files import RunFiles
from loom.core.sampling import sample_next
from loom.core.tokenizer import EOS, load_tokenizer
from loom.models.llama import ModelConfig, Transformer
from loom.models.sources import find_checkpoint, load_checkpoint_model, require_language_model


class ContiguousKVCache:
    """Keys and values of all layers, preallocated as [batch, kv_heads, max_len, head_dim]."""

    def __init__(
        self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        # latent attention expands keys and values per head (value heads may be narrower)
        heads = cfg.n_heads if cfg.latent_attention else cfg.n_kv_heads
        shape = (cfg.n_layers, batch, heads, max_len)
        self.keys = torch.zeros(*shape, cfg.attn_head_dim, device=device, dtype=dtype)
        self.values = torch.zeros(*shape, cfg.value_head_dim, device=device, dtype=dtype)
        self.pos = 0  # position of the first token of the current forward pass

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        new = k.shape[2]
        end = self.pos + new
        self.keys[layer_id, :, :, self.pos : end] = k
        self.values[layer_id, :, :, self.pos : end] = v
        mask = None
        if new > 1:  # query i (at pos + i) sees keys up to pos + i
            q_pos = torch.arange(self.pos, end, device=k.device).unsqueeze(1)
            mask = q_pos >= torch.arange(end, device=k.device).unsqueeze(0)
        keys, values = self.keys[layer_id, :, :, :end], self.values[layer_id, :, :, :end]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


@torch.no_grad()
def generate(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_id: int | None = None,
) -> list[int]:
    """Continue `prompt`; returns the new token ids (without the prompt)."""
    if not prompt:
        raise LoomError("the prompt is empty; give at least one token of text")
    if max_new_tokens < 1:
        raise LoomError(f"--max-tokens {max_new_tokens} must be at least 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise LoomError(f"--temperature {temperature} must be a finite number ≥ 0 (0 = greedy)")
    if top_k < 0:
        raise LoomError(f"--top-k {top_k} must be ≥ 0 (0 = off)")
    if not 0 < top_p <= 1:
        raise LoomError(f"--top-p {top_p} must be in (0, 1] (1 = off)")
    max_len = model.cfg.max_seq_len
    if len(prompt) + max_new_tokens > max_len:
        raise LoomError(
            f"prompt ({len(prompt)} tokens) + --max-tokens {max_new_tokens} exceeds the model's "
            f"context of {max_len} tokens; shorten the prompt or lower --max-tokens"
        )
    device = model.embed_tokens.weight.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    cache = ContiguousKVCache(
        model.cfg, 1, len(prompt) + max_new_tokens, device, model.embed_tokens.weight.dtype
    )
    model.eval()
    tokens = torch.tensor([prompt], device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens, kv_cache=cache, start_pos=cache.pos)
        cache.pos += tokens.shape[1]
        next_id = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
        if stop_id is not None and int(next_id) == stop_id:
            break
        out.append(int(next_id))
        tokens = next_id.view(1, 1)
    return out


def load_for_generation(path: str | Path, device: torch.device) -> tuple[Transformer, Path]:
    """A model from a run folder (its latest checkpoint) or a step folder; and the run folder."""
    checkpoint, run_dir = find_checkpoint(path)
    with tempfile.TemporaryDirectory() as scratch:
        return load_checkpoint_model(checkpoint, device, Path(scratch)), run_dir


def generate_text(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 50,
    top_p: float = 0.95,
    seed: int | None = None,
    device: torch.device | None = None,
) -> str:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, run_dir = load_for_generation(path, device)
    require_language_model(model, path, "generate text")
    tokenizer = load_tokenizer(RunFiles(run_dir).tokenizer)
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    new = generate(
        model, ids, max_new_tokens, temperature, top_k, top_p, seed, tokenizer.token_to_id(EOS)
    )
    return tokenizer.decode(new)
