"""`loom serve`: load a model, size the paged KV cache, start the engine and the HTTP server."""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tokenizers import Tokenizer

from loom.core.chat import ChatTemplate
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.tokenizer import EOS, load_tokenizer
from loom.models.llama import Transformer
from loom.serve.engine import Engine, EngineConfig, EngineMetrics, ModelRunner, StepBatch
from loom.serve.kv_cache import PagedKVCache

if TYPE_CHECKING:
    from loom.serve.api import ServedModel

API_KEY_ENV = "LOOM_API_KEY"


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # None: $LOOM_API_KEY if set, else no key
    served_name: str | None = None  # None: the model folder's name
    max_batch: int = 32
    max_queue: int = 256
    step_tokens: int = 256
    block_size: int = 16
    kv_cache_mb: int | None = None  # None: 1 GiB on CPU, 80 % of free memory on a GPU
    dtype: str | None = None  # fp32 | bf16; None: fp32 on CPU, bf16 on a GPU
    quantize: str | None = None  # int8: torchao weight-only
    adapters: dict[str, str] = field(default_factory=dict)  # served name → LoRA run / folder
    tp: int = 1

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise LoomError(f"--port {self.port} must be in 1..65535")
        for name in ("max_batch", "max_queue", "step_tokens", "block_size", "tp"):
            if getattr(self, name) < 1:
                raise LoomError(f"--{name.replace('_', '-')} must be at least 1")
        if self.kv_cache_mb is not None and self.kv_cache_mb < 1:
            raise LoomError("--kv-cache-mb must be at least 1")
        if self.dtype not in (None, "fp32", "bf16"):
            raise LoomError(f"--dtype {self.dtype!r} must be fp32 or bf16")
        if self.quantize not in (None, "int8"):
            raise LoomError(f"--quantize {self.quantize!r}: only int8 is supported")


class LocalRunner:
    """Runs the whole model in this process."""

    def __init__(self, model: Transformer, cache: PagedKVCache) -> None:
        from loom.serve.adapters import adapter_layers

        self.model = model
        self.cache = cache
        self.device = model.rope_cos.device
        self.adapter_layers = adapter_layers(model)

    @torch.no_grad()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        if self.adapter_layers:
            from loom.serve.adapters import select_adapters

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


def stop_token_ids(tokenizer: Tokenizer, tokenizer_dir: Path, template: ChatTemplate) -> set[int]:
    """End of text as the model knows it: the tokenizer's eos token, the HF generation
    config's eos ids (what `transformers` stops on), and Loom's own end-of-text token."""
    ids: set[int] = set()
    for text in (template.eos_token, EOS):
        if text is not None and (i := tokenizer.token_to_id(text)) is not None:
            ids.add(i)
    generation = tokenizer_dir / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else eos or [])
    return ids


def kv_blocks(model: Transformer, opts: ServeOptions, device: torch.device) -> int:
    cfg = model.cfg
    dtype_bytes = model.rope_cos.new_empty((), dtype=model_dtype(model)).element_size()
    per_block = PagedKVCache.bytes_per_block(
        cfg.n_layers, opts.block_size, cfg.n_kv_heads // opts.tp, cfg.attn_head_dim, dtype_bytes
    )
    if opts.kv_cache_mb is not None:
        budget = opts.kv_cache_mb * 2**20
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.8)
    else:
        budget = 2**30
    blocks = budget // per_block
    needed = -(-cfg.max_seq_len // opts.block_size)
    if blocks < needed:
        logger.warning(
            "the KV cache (%d MiB) holds %d tokens, less than one full context (%d); requests "
            "longer than that are refused",
            budget // 2**20,
            blocks * opts.block_size,
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
    src: Path, opts: ServeOptions, device: torch.device, scratch: Path
) -> tuple[Transformer, Path, dict[str, int]]:
    """The model (LoRA runs merged, adapters attached, quantized if asked), its tokenizer
    folder, and the adapters' served names → indices."""
    from loom.core.lora import lora_layers, merge_lora
    from loom.models.sources import load_model
    from loom.serve.adapters import attach_adapters

    dtype_name = opts.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    model, tokenizer_dir = load_model(src, torch.float32, scratch, device)
    if any(True for _ in lora_layers(model)):
        merged = merge_lora(model)
        logger.info("merged the LoRA adapters of %d layers into the base weights", merged)
    model.to(dtype).eval()
    if opts.quantize == "int8":  # before the adapters, which stay in `dtype` beside the int8
        from loom.core.quantize import quantize_int8_weight_only

        quantize_int8_weight_only(model)
    names = attach_adapters(model, opts.adapters) if opts.adapters else {}
    return model, tokenizer_dir, names


def build_engine(
    src: Path, opts: ServeOptions, scratch: Path, metrics: EngineMetrics | None = None
) -> tuple[Engine, ServedModel, ModelRunner]:
    """The engine over the model at `src` (on `opts.tp` local workers when > 1), and what the
    HTTP layer needs to know about the model."""
    from loom.serve.api import ServedModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runner: ModelRunner
    if opts.tp > 1:
        from loom.serve.tensor_parallel import start_tp_runner

        runner, model, tokenizer_dir, adapters = start_tp_runner(src, opts, scratch)
        num_blocks = runner.num_blocks
    else:
        model, tokenizer_dir, adapters = load_served_model(src, opts, device, scratch)
        num_blocks = kv_blocks(model, opts, device)
        runner = LocalRunner(model, new_cache(model, opts, num_blocks, device))
    tokenizer = load_tokenizer(tokenizer_dir)
    template = ChatTemplate.from_tokenizer_dir(tokenizer_dir)
    engine = Engine(
        runner,
        tokenizer,
        stop_token_ids(tokenizer, tokenizer_dir, template),
        model.cfg.max_seq_len,
        EngineConfig(opts.max_batch, opts.max_queue, opts.step_tokens, opts.block_size, num_blocks),
        metrics,
    )
    name = opts.served_name or (src.stem if src.suffix == ".gguf" else src.resolve().name)
    served = ServedModel(name, tokenizer, template, model.cfg.max_seq_len, adapters)
    return engine, served, runner


def new_cache(
    model: Transformer, opts: ServeOptions, num_blocks: int, device: torch.device
) -> PagedKVCache:
    """This process's cache: its share of the key/value heads under tensor parallelism."""
    cfg = model.cfg
    return PagedKVCache(
        cfg.n_layers,
        num_blocks,
        opts.block_size,
        cfg.n_kv_heads // opts.tp,
        cfg.attn_head_dim,
        device,
        model_dtype(model),
    )


def serve(model_path: str | Path, opts: ServeOptions) -> None:
    """Load, then serve until interrupted (Ctrl-C)."""
    import uvicorn

    from loom.serve.api import create_app
    from loom.serve.metrics import ServeMetrics

    opts.validate()
    src = Path(model_path)
    api_key = opts.api_key if opts.api_key is not None else os.environ.get(API_KEY_ENV)
    if opts.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning(
            "serving on %s without an API key: anyone who can reach this address can use the "
            "model; pass --api-key or set %s",
            opts.host,
            API_KEY_ENV,
        )
    metrics = ServeMetrics(opts.max_batch)
    with tempfile.TemporaryDirectory() as scratch:
        engine, served, runner = build_engine(src, opts, Path(scratch), metrics)
        app = create_app(engine, served, metrics, api_key)
        # HTTP in a thread, the engine in the main thread; SIGTERM / Ctrl-C stop both.
        http = uvicorn.Server(
            uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning")
        )
        http_thread = threading.Thread(target=http.run, name="loom-http", daemon=True)
        signal.signal(signal.SIGTERM, lambda *_: engine.stop())
        http_thread.start()
        while not http.started:
            if not http_thread.is_alive():
                raise LoomError(
                    f"could not listen on {opts.host}:{opts.port} (is the port in use?); "
                    "pass another --port"
                )
            time.sleep(0.05)
        logger.info(
            "serving %s%s on http://%s:%d/v1 (KV cache %d blocks of %d tokens, batch ≤ %d%s)",
            served.name,
            f" and adapters {', '.join(served.adapters)}" if served.adapters else "",
            opts.host,
            opts.port,
            engine.config.num_blocks,
            opts.block_size,
            opts.max_batch,
            f", {opts.tp} tensor-parallel workers" if opts.tp > 1 else "",
        )
        try:
            engine.run_forever()
        except KeyboardInterrupt:
            pass
        finally:
            http.should_exit = True
            http_thread.join(timeout=10)
            close = getattr(runner, "close", None)
            if close is not None:
                close()
