"""The shape of a Llama-family decoder as plain data, without torch: the planner (`loom plan`)
and the presets read it without paying for the torch import; loom.models.llama builds from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal


@dataclass
class RopeScaling:
    """Llama-3 frequency scaling: long wavelengths are divided by `factor`, short ones kept."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192


@dataclass
class MoEConfig:
    """Mixture of experts in place of the dense MLP (`experts > 0`): a softmax router picks
    `top_k` of `experts` SwiGLU experts per token; `shared_experts` × `expert_ffn_hidden` is
    the hidden size of an MLP every token also goes through (Qwen-MoE, DeepSeek)."""

    experts: int = 0  # 0 = a dense model
    top_k: int = 2
    shared_experts: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE: the shared MLP's output × sigmoid(gate(x))
    expert_ffn_hidden: int = 0  # 0 = model.ffn_hidden
    every: int = 1  # an MoE layer every n-th layer (after the dense ones)
    first_dense_layers: int = 0  # DeepSeek: the first layers stay dense
    norm_top_k: bool = True  # renormalise the top-k router weights to sum 1 (Mixtral)
    balance: Literal["aux_loss", "bias"] = "aux_loss"
    aux_loss_weight: float = 0.01  # Switch/Mixtral load-balancing loss, per micro-batch
    bias_update_rate: float = 0.001  # DeepSeek-V3's auxiliary-loss-free balancing step
    capacity_factor: float = 0.0  # 0 = dropless; else each expert takes at most
    # capacity_factor × tokens × top_k / experts tokens per micro-batch in training, the rest
    # are dropped (passed on by the residual); evaluation and serving are always dropless

    @property
    def enabled(self) -> bool:
        return self.experts > 0


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
    moe: MoEConfig = field(default_factory=MoEConfig)
    # DeepSeek's multi-head latent attention when kv_lora_rank > 0: keys and values are
    # expanded from one kv_lora_rank-wide vector per token (plus one rope_head_dim-wide rotary
    # key shared by the heads), queries from a q_lora_rank-wide one (0: a full projection);
    # head_dim is then the query/key head width (rope_head_dim of it rotary), v_head_dim the
    # value head width
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    rope_head_dim: int = 0
    v_head_dim: int = 0
    # > 0: a score head of this many outputs per position in place of the language-model head
    # (a reward or value model, as HF's *ForSequenceClassification; never tied to the embedding)
    num_labels: int = 0

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def latent_attention(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def rope_dim(self) -> int:
        """The width the rotary embedding turns (a latent-attention head: its rotary part)."""
        return self.rope_head_dim if self.latent_attention else self.attn_head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.latent_attention else self.attn_head_dim

    def attention_params(self) -> int:
        """Weights of one attention block (its norms included for latent attention)."""
        d, hd, heads = self.dim, self.attn_head_dim, self.n_heads
        if self.latent_attention:
            r, kv = self.q_lora_rank, self.kv_lora_rank
            query = d * r + r + r * heads * hd if r else d * heads * hd
            nope = hd - self.rope_head_dim
            keys_values = d * (kv + self.rope_head_dim) + kv + kv * heads * (nope + self.v_head_dim)
            return query + keys_values + heads * self.v_head_dim * d
        q, kv = heads * hd, self.n_kv_heads * hd
        return d * q + 2 * d * kv + q * d + (q + 2 * kv if self.qkv_bias else 0)

    @property
    def expert_hidden(self) -> int:
        return self.moe.expert_ffn_hidden or self.ffn_hidden

    def is_moe_layer(self, layer_id: int) -> bool:
        m = self.moe
        after = layer_id - m.first_dense_layers
        return m.enabled and after >= 0 and after % m.every == 0

    @property
    def moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    def architecture(self) -> dict[str, object]:
        """The fields that decide weight shapes and numerics (what a checkpoint must match)."""
        arch = asdict(self)
        for informational in ("preset", "init_std"):
            arch.pop(informational)
        if not self.num_labels:  # language models' checkpoints predate the field
            arch.pop("num_labels")
        if not self.latent_attention:  # checkpoints of other models predate these fields
            for latent in ("q_lora_rank", "kv_lora_rank", "rope_head_dim", "v_head_dim"):
                arch.pop(latent)
        moe = arch["moe"]
        if not self.moe.enabled:
            arch.pop("moe")  # a dense model's checkpoints predate the section
        else:  # training knobs, not shapes
            for knob in ("balance", "aux_loss_weight", "bias_update_rate", "capacity_factor"):
                moe.pop(knob)
        return arch

    def num_params(self, active: bool = False) -> int:
        """Exact parameter count, computed from the shapes (no model needed); `active`: the
        parameters one token uses (its top-k experts of each MoE layer, not all)."""
        d = self.dim
        per_layer = self.attention_params() + 2 * d
        head = 0 if self.tie_embeddings else (self.num_labels or self.vocab_size) * d
        embeddings = self.vocab_size * d + head
        dense_mlp = 3 * d * self.ffn_hidden
        m = self.moe
        experts = m.top_k if active else m.experts
        moe_mlp = (
            d * m.experts  # router
            + 3 * d * self.expert_hidden * (experts + m.shared_experts)
            + (d if m.shared_expert_gate else 0)
        )
        mlps = self.moe_layers * moe_mlp + (self.n_layers - self.moe_layers) * dense_mlp
        return self.n_layers * per_layer + mlps + embeddings + d

    def flops_per_token(self, seq_len: int, frozen: bool = False) -> float:
        """Training FLOPs per token: 6·N_matmul + 12·L·(heads·head_dim)·seq_len.

        (Latent attention: 6·L·heads·(head_dim + v_head_dim)·seq_len, its value heads being
        narrower than its query/key heads.)

        N_matmul counts every weight used in a matmul (the output projection included, the
        input embedding lookup excluded); the second term is attention's QKᵀ and AV products
        over the full sequence (PaLM's convention, not halved for the causal mask). With the
        weights `frozen` (adapter training) backward skips their gradients: 4·N_matmul. An MoE
        model counts the weights a token uses (its top-k experts).
        """
        norms = self.dim * (2 * self.n_layers + 1)
        if self.latent_attention:
            norms += self.n_layers * (self.q_lora_rank + self.kv_lora_rank)
        n_matmul = self.num_params(active=True) - norms
        if not self.tie_embeddings:
            n_matmul -= self.vocab_size * self.dim  # input embedding is a lookup
        # QKᵀ over the query/key head width, AV over the value head width
        widths = self.attn_head_dim + self.value_head_dim
        attention = 6 * self.n_layers * self.n_heads * widths * seq_len
        return (4 if frozen else 6) * n_matmul + attention
