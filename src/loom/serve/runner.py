"""The model runner: loads the served model, sizes its paged KV cache and runs one packed
forward pass per engine step. The HTTP server and tensor-parallel serving both build on it;
it knows neither of them."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.lora import lora_layers, merge_lora
from loom.core.quantize import quantize_for_serving, quantize_int8_weight_only
from loom.models.gguf import gguf_int4_codes
from loom.models.llama import Transformer
from loom.models.sources import load_model, require_language_model
from loom.serve.adapters import adapter_layers, attach_adapters, select_adapters
from loom.serve.engine import StepBatch
from loom.serve.kv_cache import PagedKVCache


@dataclass(frozen=True)
class RunnerSetup:
    """The part of `loom serve`'s options that loading the model and sizing its cache need
    (filled from ServeOptions by the server). Tensor-parallel workers get it as JSON, which
    keeps the API key out of their command lines."""

    dtype: str | None  # fp32 | bf16; None: fp32 on CPU, bf16 on a GPU
    quantize: str | None  # int8 | int4 (weight-only, packed; see loom.core.quantize) or None
    block_size: int
    kv_cache_mb: int | None  # None: 1 GiB on CPU, 80 % of free memory on a GPU
    tp: int
    adapters: dict[str, str] = field(default_factory=dict)  # served name → LoRA run / folder
    kv_dtype: str = "auto"  # the KV cache's: auto (the model's dtype) | int8 (see PagedKVCache)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> RunnerSetup:
        return cls(**json.loads(text))


class LocalRunner:
    """Runs the whole model in this process."""

    def __init__(self, model: Transformer, cache: PagedKVCache) -> None:
        self.model = model
        self.cache = cache
        self.device = model.rope_cos.device
        self.adapter_layers = adapter_layers(model)

    @torch.no_grad()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        if self.adapter_layers:
            adapters = None if batch.adapters is None else batch.adapters.to(self.device)
            select_adapters(self.adapter_layers, adapters)
        return run_step(self.model, self.cache, batch, self.device)


def run_step(
    model: Transformer, cache: PagedKVCache, batch: StepBatch, device: torch.device
) -> torch.Tensor:
    """One packed forward pass; logits [rows, vocab] on the CPU in fp32 for sampling."""
    cache.layout = batch.layout.to(device)
    logits = model(
        batch.tokens.to(device),
        kv_cache=cache,
        positions=batch.positions.to(device),
        logits_at=batch.logits_at.to(device),
    )
    return logits[0].float().cpu()


def kv_blocks(model: Transformer, setup: RunnerSetup, device: torch.device) -> int:
    """How many cache blocks fit this process's budget (its share of the heads under TP)."""
    cfg = model.cfg
    if cfg.latent_attention:
        raise LoomError(
            "serving a latent-attention model (model.kv_lora_rank > 0) is not built: the paged "
            "cache holds keys and values of one head width; use `loom generate` or `loom eval`"
        )
    dtype_bytes = model.rope_cos.new_empty((), dtype=model_dtype(model)).element_size()
    per_block = PagedKVCache.bytes_per_block(
        cfg.n_layers,
        setup.block_size,
        cfg.n_kv_heads // setup.tp,
        cfg.attn_head_dim,
        dtype_bytes,
        setup.kv_dtype,
    )
    if setup.kv_cache_mb is not None:
        budget = setup.kv_cache_mb * 2**20
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.8)
    else:
        budget = 2**30
    blocks = budget // per_block
    needed = -(-cfg.max_seq_len // setup.block_size)
    if blocks < needed:
        logger.warning(
            "the KV cache (%d MiB) holds %d tokens, less than one full context (%d); requests "
            "longer than that are refused",
            budget // 2**20,
            blocks * setup.block_size,
            cfg.max_seq_len,
        )
    if blocks < 1:
        raise LoomError(
            f"--kv-cache-mb {budget // 2**20} holds no block of {per_block} bytes; give more"
        )
    return int(blocks)


def model_dtype(model: Transformer) -> torch.dtype:
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def load_served_model(
    src: Path, setup: RunnerSetup, device: torch.device, scratch: Path
) -> tuple[Transformer, Path, dict[str, int]]:
    """The model (LoRA runs merged, adapters attached, quantized if asked), its tokenizer
    folder, and the adapters' served names → indices."""
    dtype_name = setup.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    model, tokenizer_dir = load_model(src, torch.float32, scratch, device)
    require_language_model(model, src, "be served")
    if any(True for _ in lora_layers(model)):
        merged = merge_lora(model)
        logger.info("merged the LoRA adapters of %d layers into the base weights", merged)
    model.to(dtype).eval()
    # Before the adapters, whose factors stay in `dtype` beside the packed weights.
    if setup.quantize and device.type == "cpu":
        # A GGUF's own 4-bit blocks are served as they are where the format allows (Q4_0, Q4_1).
        from_gguf = setup.quantize == "int4" and src.suffix == ".gguf"
        source = gguf_int4_codes(src) if from_gguf else None
        quantize_for_serving(model, setup.quantize, int4_source=source)
    elif setup.quantize == "int8":  # a GPU: torchao's int8 (the packed kernels are CPU ones)
        quantize_int8_weight_only(model)
    elif setup.quantize:
        raise LoomError(
            f"--quantize {setup.quantize} runs PyTorch's CPU kernels; on a GPU use --quantize int8 "
            "or none"
        )
    names = attach_adapters(model, setup.adapters) if setup.adapters else {}
    return model, tokenizer_dir, names


def new_cache(
    model: Transformer, setup: RunnerSetup, num_blocks: int, device: torch.device
) -> PagedKVCache:
    """This process's cache: its share of the key/value heads under tensor parallelism."""
    cfg = model.cfg
    return PagedKVCache(
        cfg.n_layers,
        num_blocks,
        setup.block_size,
        cfg.n_kv_heads // setup.tp,
        cfg.attn_head_dim,
        device,
        model_dtype(model),
        setup.kv_dtype,
    )
