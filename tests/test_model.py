"""The model: published sizes, equality with `transformers`, meta build, KV cache, sampling."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from loom.core.presets import PRESETS, get_preset
from loom.core.sampling import sample_next
from loom.eval.generate import generate
from loom.models.hf import hf_config_dict, to_hf_state_dict
from loom.models.llama import ModelConfig, RopeScaling, build_model

# Parameter counts published by the model authors (model cards / safetensors metadata).
PUBLISHED = {
    "smollm2-135m": 134_515_008,
    "qwen2.5-0.5b": 494_032_768,
    "llama3.2-1b": 1_235_814_400,
    "llama3-8b": 8_030_261_248,
    "llama3.1-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "llama3-405b": 405_853_388_800,
    "mixtral-8x7b": 46_702_792_704,
}
# mixtures of experts: (total, active per token) in billions, as their model cards round them
PUBLISHED_MOE = {"mixtral-8x7b": (46.7, 12.9), "qwen1.5-moe-a2.7b": (14.3, 2.7)}
# DeepSeek-V3's report: "671B total parameters with 37B activated", whole billions cut down
PUBLISHED_MOE_WHOLE = {"deepseek-v3": (671, 37)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count(name: str) -> None:
    cfg = get_preset(name)
    model = build_model(cfg)  # meta device: no memory even for 405B
    counted = sum(p.numel() for p in model.parameters())
    assert counted == cfg.num_params()
    if name in PUBLISHED:
        assert counted == PUBLISHED[name]
    if name in PUBLISHED_MOE:
        total, active = PUBLISHED_MOE[name]
        assert (round(counted / 1e9, 1), round(cfg.num_params(active=True) / 1e9, 1)) == (
            total,
            active,
        )
    if name in PUBLISHED_MOE_WHOLE:
        whole = (counted // 10**9, cfg.num_params(active=True) // 10**9)
        assert whole == PUBLISHED_MOE_WHOLE[name]
    published = {**PUBLISHED, **PUBLISHED_MOE, **PUBLISHED_MOE_WHOLE}
    assert name in published or name.startswith("tiny")


def test_required_presets_exist() -> None:
    assert {
        "tiny",
        "smollm2-135m",
        "llama3-8b",
        "llama3-70b",
        "llama3-405b",
        "qwen2.5-0.5b",
    } <= set(PRESETS)


def small(**changes: object) -> ModelConfig:
    base = dict(
        vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=64
    )
    return ModelConfig(**{**base, **changes})  # type: ignore[arg-type]


VARIANTS = {
    "gqa": small(),
    "mha-untied": small(n_kv_heads=4),
    "tied": small(tie_embeddings=True),
    "qkv-bias (qwen2)": small(qkv_bias=True, rope_theta=1e6, norm_eps=1e-6),
    "llama3-rope-scaling": small(
        rope_theta=500000.0, rope_scaling=RopeScaling(factor=8.0, original_max_seq_len=16)
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(name: str) -> None:
    """Same weights in Loom and in transformers' own implementation give the same logits."""
    cfg = VARIANTS[name]
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    model.init_weights()
    with torch.no_grad():  # random biases and norm weights, so they are really compared
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.normal_(1.0 if "norm" in n else 0.0, 0.1)
    hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg))
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    missing, unexpected = hf.load_state_dict(
        to_hf_state_dict(model.state_dict(), cfg), strict=False
    )
    assert not unexpected and not [m for m in missing if "rotary" not in m]
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        ours = model(tokens)
        theirs = hf(tokens).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_layers_keyed_by_index_and_hf_names() -> None:
    model = build_model(small())
    assert list(model.layers.keys()) == ["0", "1"]
    names = set(dict(model.named_parameters()))
    assert "layers.1.self_attn.q_proj.weight" in names
    assert "layers.0.mlp.down_proj.weight" in names


def test_meta_build_then_seeded_init_is_deterministic() -> None:
    cfg = small()
    meta = build_model(cfg)
    assert all(p.device.type == "meta" for p in meta.parameters())

    def init(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(123)  # the global RNG plays no part: each parameter has its own
        m = build_model(cfg, "cpu")
        m.init_weights(seed)
        return m.state_dict()

    a, b, c = init(1), init(1), init(2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["layers.0.self_attn.q_proj.weight"], c["layers.0.self_attn.q_proj.weight"]
    )
    # Residual projections start smaller (1/sqrt(2·layers)); norms start at one.
    assert a["layers.0.self_attn.o_proj.weight"].std() < a["layers.0.self_attn.q_proj.weight"].std()
    assert torch.equal(a["norm.weight"], torch.ones(cfg.dim))


def latent(**changes: object) -> ModelConfig:
    """A small model with DeepSeek's latent attention (query/key heads of 20, 8 of them
    rotary, value heads of 10)."""
    fields = dict(n_kv_heads=4, head_dim=20, q_lora_rank=24, kv_lora_rank=16, rope_head_dim=8)
    return small(**{**fields, "v_head_dim": 10, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("q_lora_rank", [24, 0], ids=["compressed-queries", "full-queries"])
def test_latent_attention_matches_transformers_deepseek_v3(q_lora_rank: int) -> None:
    """Loom's latent attention and transformers' DeepseekV3 (dense layers, non-interleaved
    rotary) give the same logits for the same weights, loaded by name."""
    cfg = latent(q_lora_rank=q_lora_rank)
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        q_lora_rank=q_lora_rank or None,
        kv_lora_rank=cfg.kv_lora_rank,
        qk_rope_head_dim=cfg.rope_head_dim,
        qk_nope_head_dim=cfg.head_dim - cfg.rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        first_k_dense_replace=cfg.n_layers,  # no experts: Loom's router is not DeepSeek's
        rope_interleave=False,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager")
    with torch.no_grad():  # norms away from one, so that they are really compared
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.1)
    model = build_model(cfg, "cpu")
    model.init_buffers()
    weights = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    model.load_state_dict(weights, strict=True)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    tokens = torch.randint(0, cfg.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf.eval()(tokens).logits, atol=1e-5, rtol=1e-5)


def test_flops_per_token_counts_every_matmul_weight() -> None:
    """6·N counts each weight used in a matmul: all nn.Linear weights plus a tied embedding."""
    for cfg in (small(), small(tie_embeddings=True)):
        model = build_model(cfg)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
        if cfg.tie_embeddings:
            linear += model.embed_tokens.weight.numel()
        seq = 50
        attention = 12 * cfg.n_layers * cfg.dim * seq
        assert cfg.flops_per_token(seq) == 6 * linear + attention


@pytest.mark.parametrize(
    "cfg",
    [small(), small(qkv_bias=True, tie_embeddings=True), latent()],
    ids=["gqa", "tied", "mla"],
)
def test_kv_cache_generation_equals_full_recompute(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    model.init_weights()
    prompt = [5, 17, 3, 42, 8]
    cached = generate(model, prompt, max_new_tokens=20, temperature=0)
    tokens = list(prompt)
    for _ in range(20):  # no cache: the whole sequence every step
        with torch.no_grad():
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert cached == tokens[len(prompt) :]


def test_sampling_filters() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    gen = torch.Generator().manual_seed(0)
    assert int(sample_next(logits, 0.0, 0, 1.0, gen)) == 1
    assert int(sample_next(logits, 1.0, 1, 1.0, gen)) == 1  # top-k 1 is greedy
    assert int(sample_next(logits, 1.0, 0, 1e-6, gen)) == 1  # tiny top-p keeps only the best
    drawn = {int(sample_next(logits, 5.0, 2, 1.0, gen)) for _ in range(200)}
    assert drawn == {1, 2}  # top-k 2 at high temperature: both survivors, nothing else
    # Probabilities: token 1 ≈ .474, 2 ≈ .429, 4 ≈ .064, 0 ≈ .024, 3 ≈ .009.
    drawn = {int(sample_next(logits, 1.0, 0, 0.9, gen)) for _ in range(300)}
    assert drawn == {1, 2}  # 1 and 2 reach .90 before token 4 is needed
    drawn = {int(sample_next(logits, 1.0, 0, 0.95, gen)) for _ in range(300)}
    assert drawn == {1, 2, 4}


def test_seeded_sampling_is_reproducible() -> None:
    torch.manual_seed(0)
    model = build_model(small(), "cpu")
    model.init_weights()
    a = generate(model, [1, 2, 3], 15, temperature=1.0, seed=7)
    b = generate(model, [1, 2, 3], 15, temperature=1.0, seed=7)
    c = generate(model, [1, 2, 3], 15, temperature=1.0, seed=8)
    assert a == b and a != c
