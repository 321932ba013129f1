"""The shape of a Llama-family decoder as plain data, without torch: the planner (`loom plan`)
and the presets read it without paying for the torch import; loom.models.llama builds from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class RopeScaling:
    """Llama-3 frequency scaling: long wavelengths are divided by `factor`, short ones kept."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass
class ModelConfig:
    """Architecture of one decoder; `preset` names the preset the other fields started from."""

    preset: str = "custom"
    vocab_size: int = 8192
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0 = dim // n_heads
    ffn_hidden: int = 768
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def architecture(self) -> dict[str, object]:
        """The fields that decide weight shapes and numerics (what a checkpoint must match)."""
        arch = asdict(self)
        for informational in ("preset", "init_std"):
            arch.pop(informational)
        return arch

    def num_params(self) -> int:
        """Exact parameter count, computed from the shapes (no model needed)."""
        d, hd = self.dim, self.attn_head_dim
        q, kv = self.n_heads * hd, self.n_kv_heads * hd
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * d * self.ffn_hidden
        per_layer = attn + mlp + 2 * d
        embeddings = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + embeddings + d

    def flops_per_token(self, seq_len: int, frozen: bool = False) -> float:
        """Training FLOPs per token: 6·N_matmul + 12·L·(heads·head_dim)·seq_len.

        N_matmul counts every weight used in a matmul (the output projection included, the
        input embedding lookup excluded); the second term is attention's QKᵀ and AV products
        over the full sequence (PaLM's convention, not halved for the causal mask). With the
        weights `frozen` (adapter training) backward skips their gradients: 4·N_matmul.
        """
        n_matmul = self.num_params() - self.dim * (2 * self.n_layers + 1)  # minus norms
        if not self.tie_embeddings:
            n_matmul -= self.vocab_size * self.dim  # input embedding is a lookup
        attention = 12 * self.n_layers * self.n_heads * self.attn_head_dim * seq_len
        return (4 if frozen else 6) * n_matmul + attention
