"""A Llama-family decoder-only transformer (Llama 2/3, Mistral, Qwen2, SmolLM) in plain PyTorch.

Submodule names follow Hugging Face's Llama layout (`layers.0.self_attn.q_proj`, ...) so that
HF checkpoints and PEFT adapters map by prefix alone. Layers live in an `nn.ModuleDict` keyed by
index, so names survive pipeline splitting. Parallelism, recomputation and compilation are
applied from outside; nothing here knows about them.
"""

from __future__ import annotations

import math
import zlib
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from loom.core.model_config import ModelConfig as ModelConfig
from loom.core.model_config import RopeScaling as RopeScaling
from loom.models.moe import MoE


class KVCache(Protocol):
    """A key/value cache that also runs attention over what it holds: a contiguous cache
    (`loom generate`) or a paged one holding many sequences packed in one row (serving)."""

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Store this step's keys/values [batch, kv_heads, seq, head_dim]; return the
        attention of q [batch, heads, seq, head_dim] over all keys its tokens may see."""
        ...


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with Llama-3 scaling when configured."""
    hd = cfg.rope_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / s.factor, blended)
    return torch.where(wavelen < high_wavelen, inv_freq, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x: [batch, seq, heads, head_dim]."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in fp32 (written out: faster on CPU than nn.RMSNorm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.attn_head_dim
        q_dim, kv_dim = cfg.n_heads * self.head_dim, cfg.n_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.dim, q_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        # cos/sin start at this input's first position and may run longer: take what is used.
        cos, sin = cos[:seq], sin[:seq]
        # -1 heads: under tensor parallelism each rank holds only its share of the heads.
        q = apply_rope(self.q_proj(x).view(batch, seq, -1, self.head_dim), cos, sin)
        k = apply_rope(self.k_proj(x).view(batch, seq, -1, self.head_dim), cos, sin)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            out = kv_cache.attend(self.layer_id, q, k, v)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


# DeepSeek's code (and transformers') norms the compressed vectors with a fixed epsilon,
# whatever the model's norm_eps.
LATENT_NORM_EPS = 1e-6


class LatentAttention(nn.Module):
    """DeepSeek's multi-head latent attention: each token's keys and values are expanded from
    one kv_lora_rank-wide vector (what a cache would keep), its queries from a q_lora_rank-wide
    one; a rope_head_dim-wide rotary key is shared by all heads and appended to each head's
    key. Names follow DeepSeek-V3's Hugging Face layout."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        heads, self.head_dim, self.rope = cfg.n_heads, cfg.attn_head_dim, cfg.rope_head_dim
        self.v_head_dim, rank, kv_rank = cfg.v_head_dim, cfg.q_lora_rank, cfg.kv_lora_rank
        self.q_proj: nn.Linear | None = None
        if rank:
            self.q_a_proj = nn.Linear(cfg.dim, rank, bias=False)
            self.q_a_layernorm = RMSNorm(rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(rank, heads * self.head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.dim, heads * self.head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.dim, kv_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(kv_rank, LATENT_NORM_EPS)
        nope = self.head_dim - self.rope
        self.kv_b_proj = nn.Linear(kv_rank, heads * (nope + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_head_dim, cfg.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        cos, sin = cos[:seq], sin[:seq]
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(batch, seq, -1, self.head_dim)
        nope = self.head_dim - self.rope
        q_nope, q_rope = q.split([nope, self.rope], dim=-1)
        q = torch.cat((q_nope, apply_rope(q_rope, cos, sin)), dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split(
            [self.kv_b_proj.in_features, self.rope], -1
        )
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(
            batch, seq, -1, nope + self.v_head_dim
        )
        k_nope, v = kv.split([nope, self.v_head_dim], dim=-1)
        k_rope = apply_rope(k_rope.view(batch, seq, 1, self.rope), cos, sin)
        k = torch.cat((k_nope, k_rope.expand(*k_nope.shape[:-1], self.rope)), dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if kv_cache is not None:
            out = kv_cache.attend(self.layer_id, q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn: Attention | LatentAttention = (
            LatentAttention(cfg, layer_id) if cfg.latent_attention else Attention(cfg, layer_id)
        )
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp: MLP | MoE = MLP(cfg.dim, cfg.ffn_hidden)
        if cfg.is_moe_layer(layer_id):
            shared = cfg.moe.shared_experts * cfg.expert_hidden
            self.mlp = MoE(cfg, MLP(cfg.dim, shared) if shared else None)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: KVCache | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # A pipeline stage may drop the embedding (not first) or norm and head (not last).
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        # Tied models reuse embed_tokens.weight for the output projection (no lm_head); a reward
        # or value model (num_labels > 0) scores each position instead.
        outputs = cfg.num_labels or cfg.vocab_size
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, outputs, False)
        shape = (cfg.max_seq_len, cfg.rope_dim)
        self.register_buffer("rope_cos", torch.empty(shape), persistent=False)
        self.register_buffer("rope_sin", torch.empty(shape), persistent=False)

    def forward(
        self,
        tokens: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for `tokens` [batch, seq]; with a cache, `start_pos` is their first position.

        Serving packs several sequences in one row: `positions` [seq] then gives each token's
        own position, and `logits_at` the row indices whose logits are wanted (the output
        projection is as costly as a layer, so it runs only where a token is sampled).

        `doc_ids` [batch, seq] (packed fine-tuning rows): a position attends only to earlier
        positions of the same document, so packed examples never see each other. Rotary
        embeddings are relative, so a document's offset in its row does not change its logits.

        A pipeline stage without the embedding takes hidden states [batch, seq, dim] instead of
        tokens, and one without the final norm returns hidden states.
        """
        # Rotary tables from `start_pos` on; attention takes as many rows as its input is long
        # (with sequence parallelism, a stage's input holds only a slice of the sequence).
        where = slice(start_pos, None) if positions is None else positions
        cos = self.rope_cos[where].unsqueeze(1)
        sin = self.rope_sin[where].unsqueeze(1)
        h = self.embed_tokens(tokens) if self.embed_tokens is not None else tokens
        mask = document_mask(doc_ids, h.dtype) if doc_ids is not None else None
        for layer in self.layers.values():
            h = layer(h, cos, sin, kv_cache, mask)
        if self.norm is None:
            return h
        if logits_at is not None:
            h = h[:, logits_at]
        h = self.norm(h)
        if self.lm_head is None:
            assert self.embed_tokens is not None, "tied embeddings live in one stage"
            return F.linear(h, self.embed_tokens.weight)
        return self.lm_head(h)

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the rotary tables and zero the routers' state (after `to_empty`, before a
        checkpoint restores the balance bias; the rotary tables are not saved)."""
        positions = torch.arange(self.cfg.max_seq_len, dtype=torch.float64)
        angles = torch.outer(positions, rope_frequencies(self.cfg))
        angles = torch.cat((angles, angles), dim=-1)
        device = self.rope_cos.device
        self.rope_cos.copy_(angles.cos().float().to(device))
        self.rope_sin.copy_(angles.sin().float().to(device))
        for module in self.modules():
            if isinstance(module, MoE):
                module.reset_routing()

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Initialise every parameter in place (after `to_empty`), see `init_parameter_`."""
        for name, param in self.named_parameters():
            init_parameter_(self.cfg, name, param, seed)
        self.init_buffers()


def document_mask(doc_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention mask [batch, 1, seq, seq]: 0 where a position may attend (earlier
    positions of its own document), -inf elsewhere. Built once for all layers, in the
    activations' dtype (attention would otherwise convert a boolean mask in every layer and
    keep each copy for the backward pass)."""
    seq = doc_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=doc_ids.device).tril()
    allowed = (doc_ids[:, None, :, None] == doc_ids[:, None, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=doc_ids.device)
    return mask.masked_fill_(~allowed, float("-inf"))


@torch.no_grad()
def init_parameter_(cfg: ModelConfig, name: str, tensor: torch.Tensor, seed: int) -> None:
    """Fill `tensor`, the whole value of parameter `name`, with its initial value.

    Normal(0, init_std) for matrices, scaled by 1/sqrt(2·layers) on the projections that write
    into the residual stream; ones for norms; zeros for biases. Each parameter draws from its
    own generator seeded by (seed, name), so the values depend neither on the order in which
    parameters are created nor on how the model is split across devices.
    """
    if "norm" in name:
        tensor.fill_(1.0)
    elif name.endswith(".bias"):
        tensor.zero_()
    else:
        std = cfg.init_std
        if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
            std /= math.sqrt(2 * cfg.n_layers)
        generator = torch.Generator(device=tensor.device)
        generator.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        tensor.normal_(0.0, std, generator=generator)


def build_model(cfg: ModelConfig, device: torch.device | str = "meta") -> Transformer:
    """Build on the meta device (no memory), then materialise on `device` uninitialised.

    Call `init_weights()` (seeded) or load a checkpoint afterwards.
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    if str(device) != "meta":
        model.to_empty(device=device)
    return model
