"""`loom serve`: load a model, size the paged KV cache, start the engine and the HTTP server."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI

from loom.core.chat import ChatTemplate, stop_token_ids
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.tokenizer import load_tokenizer
from loom.models.llama import Transformer
from loom.serve.api import ServingApp
from loom.serve.engine import Engine, EngineConfig, EngineMetrics, ModelRunner
from loom.serve.kv_cache import KV_DTYPES, PagedKVCache
from loom.serve.metrics import ServeMetrics
from loom.serve.requests import ServedModel
from loom.serve.runner import (
    LocalRunner,
    RunnerSetup,
    kv_blocks,
    load_served_model,
    model_dtype,
    new_cache,
)
from loom.serve.tensor_parallel import start_tp_runner

API_KEY_ENV = "LOOM_API_KEY"


def _flag(help: str, **more: object) -> dict[str, object]:
    """Field metadata `loom serve`'s flags are generated from (loom.commands.options)."""
    return {"help": help or None, **more}


_ENGINE = EngineConfig()


@dataclass
class ServeOptions:
    """`loom serve`'s options and the pipeline's `[serve]`; the engine's knobs default to
    EngineConfig's. Validated on construction."""

    host: str = field(default="127.0.0.1", metadata=_flag("default 127.0.0.1 (this machine only)"))
    port: int = field(default=8000, metadata=_flag(""))
    # None: $LOOM_API_KEY if set, else no key
    api_key: str | None = field(default=None, metadata=_flag("require 'Authorization: Bearer KEY'"))
    served_name: str | None = field(
        default=None, metadata=_flag("model name (default: folder name)")
    )
    max_batch: int = field(default=_ENGINE.max_batch, metadata=_flag("sequences decoded together"))
    max_queue: int = field(
        default=_ENGINE.max_queue, metadata=_flag("waiting sequences before 429")
    )
    step_tokens: int = field(
        default=_ENGINE.step_tokens, metadata=_flag("tokens per forward pass (prefill chunks)")
    )
    block_size: int = field(default=_ENGINE.block_size, metadata=_flag("tokens per KV cache block"))
    prefix_cache: bool = field(
        default=_ENGINE.prefix_cache,
        metadata=_flag("reuse the KV blocks of prompts' shared prefixes (default: on)"),
    )
    speculate: str | None = field(
        default=None,
        metadata=_flag(
            "speculative decoding: ngram (prompt lookup) or a draft model (HF folder, GGUF "
            "or Loom run) over the same tokenizer",
            metavar="ngram|MODEL",
        ),
    )
    speculate_tokens: int = field(
        default=_ENGINE.speculate_tokens,
        metadata=_flag("tokens proposed per sequence and step", metavar="K"),
    )
    kv_cache_mb: int | None = field(
        default=None, metadata=_flag("default 1024 on CPU, 80%% of free GPU memory")
    )
    kv_dtype: str = field(
        default="auto",
        metadata=_flag(
            "KV cache storage: auto (the model's dtype) or int8 (per token and head scales; "
            "about 2x the tokens of bf16, 4x of fp32)",
            choices=KV_DTYPES,
        ),
    )
    dtype: str | None = field(default=None, metadata=_flag("", choices=("fp32", "bf16")))
    quantize: str | None = field(
        default=None,
        metadata=_flag(
            "weight-only: int8 per output row, int4 in groups of 32 (fused CPU kernels)",
            choices=("int8", "int4"),
        ),
    )
    # served name → LoRA run or PEFT folder; on the command line a repeated NAME=PATH
    adapters: dict[str, str] = field(
        default_factory=dict,
        metadata=_flag(
            "serve a LoRA adapter (PEFT folder or Loom LoRA run) as model NAME; repeatable",
            flags=("--adapter",),
            metavar="NAME=PATH",
            append=True,
            convert=lambda items: adapter_pairs(items or []),
        ),
    )
    tp: int = field(default=1, metadata=_flag("tensor-parallel workers (local)"))

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise LoomError(f"--port {self.port} must be in 1..65535")
        if self.tp < 1:
            raise LoomError("--tp must be at least 1")
        self.engine_config(1)  # checks max_batch, max_queue, step_tokens and block_size
        if self.kv_cache_mb is not None and self.kv_cache_mb < 1:
            raise LoomError("--kv-cache-mb must be at least 1")
        if self.speculate not in (None, "ngram") and not Path(self.speculate).exists():
            raise LoomError(
                f"--speculate {self.speculate!r}: give ngram, or a draft model that exists"
            )
        if self.speculate not in (None, "ngram") and self.tp > 1:
            raise LoomError("--speculate MODEL runs the draft in one process: leave out --tp")
        if self.dtype not in (None, "fp32", "bf16"):
            raise LoomError(f"--dtype {self.dtype!r} must be fp32 or bf16")
        if self.kv_dtype not in KV_DTYPES:
            raise LoomError(f"--kv-dtype {self.kv_dtype!r}: use {' or '.join(KV_DTYPES)}")
        if self.quantize not in (None, "int8", "int4"):
            raise LoomError(f"--quantize {self.quantize!r}: use int8 or int4 (or leave it out)")

    def engine_config(self, num_blocks: int) -> EngineConfig:
        return EngineConfig(
            self.max_batch,
            self.max_queue,
            self.step_tokens,
            self.block_size,
            num_blocks,
            self.prefix_cache,
            self.speculate if self.speculate in (None, "ngram") else "draft",
            self.speculate_tokens,
        )


@dataclass
class ServeJob(ServeOptions):
    """A model and how to serve it: `loom serve MODEL`'s options and the pipeline's `[serve]`
    (where `model` defaults to an earlier stage)."""

    model: str = field(default="", metadata=_flag("", positional=True, metavar="MODEL"))


def adapter_pairs(items: list[str]) -> dict[str, str]:
    """`--adapter NAME=PATH` (repeated) as {NAME: PATH}."""
    adapters = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise LoomError(f"--adapter {item!r}: write NAME=PATH")
        adapters[name] = path
    return adapters


def runner_setup(opts: ServeOptions) -> RunnerSetup:
    """What the model runner (and every tensor-parallel worker) needs of the options."""
    return RunnerSetup(
        dtype=opts.dtype,
        quantize=opts.quantize,
        block_size=opts.block_size,
        kv_cache_mb=opts.kv_cache_mb,
        tp=opts.tp,
        adapters=opts.adapters,
        kv_dtype=opts.kv_dtype,
    )


def build_engine(
    src: Path, opts: ServeOptions, scratch: Path, metrics: EngineMetrics | None = None
) -> tuple[Engine, ServedModel, ModelRunner]:
    """The engine over the model at `src` (on `opts.tp` local workers when > 1), and what the
    HTTP layer needs to know about the model."""
    setup = runner_setup(opts)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    runner: ModelRunner
    draft: ModelRunner | None = None
    if opts.tp > 1:
        runner, model, tokenizer_dir, adapters = start_tp_runner(src, setup, scratch)
        num_blocks = runner.num_blocks
    else:
        model, tokenizer_dir, adapters = load_served_model(src, setup, device, scratch)
        num_blocks = kv_blocks(model, setup, device)
        if opts.speculate not in (None, "ngram"):
            draft, num_blocks = load_draft(Path(opts.speculate), model, setup, device, scratch)
        runner = LocalRunner(model, new_cache(model, setup, num_blocks, device))
    tokenizer = load_tokenizer(tokenizer_dir)
    template = ChatTemplate.from_tokenizer_dir(tokenizer_dir)
    engine = Engine(
        runner,
        tokenizer,
        stop_token_ids(tokenizer, tokenizer_dir, template),
        model.cfg.max_seq_len,
        opts.engine_config(num_blocks),
        metrics,
        draft,
    )
    name = opts.served_name or (src.stem if src.suffix == ".gguf" else src.resolve().name)
    served = ServedModel(name, tokenizer, template, model.cfg.max_seq_len, adapters)
    return engine, served, runner


def load_draft(
    src: Path, model: Transformer, setup: RunnerSetup, device: torch.device, scratch: Path
) -> tuple[ModelRunner, int]:
    """The draft model's runner (plain weights, no adapters) and the KV blocks both caches get
    from the budget the target alone had (the same block ids index both)."""
    plain = replace(setup, quantize=None, adapters={})
    draft, _, _ = load_served_model(src, plain, device, scratch / "draft")
    if draft.cfg.vocab_size != model.cfg.vocab_size:
        raise LoomError(
            f"--speculate {src}: its vocabulary has {draft.cfg.vocab_size} tokens, the served "
            f"model's {model.cfg.vocab_size}; a draft must share the model's tokenizer"
        )
    if draft.cfg.max_seq_len < model.cfg.max_seq_len:
        raise LoomError(
            f"--speculate {src}: its context ({draft.cfg.max_seq_len}) is shorter than the "
            f"served model's ({model.cfg.max_seq_len})"
        )

    def block_bytes(m: Transformer) -> int:
        cfg, size = m.cfg, torch.empty((), dtype=model_dtype(m)).element_size()
        return PagedKVCache.bytes_per_block(
            cfg.n_layers, setup.block_size, cfg.n_kv_heads, cfg.attn_head_dim, size, setup.kv_dtype
        )

    share = block_bytes(model) / (block_bytes(model) + block_bytes(draft))
    num_blocks = max(int(kv_blocks(model, setup, device) * share), 1)
    logger.info("speculating with the draft %s (%d KV blocks each)", src, num_blocks)
    return LocalRunner(draft, new_cache(draft, setup, num_blocks, device)), num_blocks


def resolve_api_key(opts: ServeOptions) -> str | None:
    """--api-key, else $LOOM_API_KEY; warns when a public address is served without one."""
    api_key = opts.api_key if opts.api_key is not None else os.environ.get(API_KEY_ENV)
    if opts.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logger.warning(
            "serving on %s without an API key: anyone who can reach this address can use the "
            "model; pass --api-key or set %s",
            opts.host,
            API_KEY_ENV,
        )
    return api_key


def start_http(app: FastAPI, opts: ServeOptions) -> tuple[uvicorn.Server, threading.Thread]:
    """uvicorn in a thread (the engine keeps the main thread), once it listens."""
    http = uvicorn.Server(uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning"))
    http_thread = threading.Thread(target=http.run, name="loom-http", daemon=True)
    http_thread.start()
    while not http.started:
        if not http_thread.is_alive():
            raise LoomError(
                f"could not listen on {opts.host}:{opts.port} (is the port in use?); "
                "pass another --port"
            )
        time.sleep(0.05)
    return http, http_thread


def serve(model_path: str | Path, opts: ServeOptions) -> None:
    """Load, then serve until interrupted (Ctrl-C or SIGTERM)."""
    api_key = resolve_api_key(opts)
    metrics = ServeMetrics(opts.max_batch)
    with tempfile.TemporaryDirectory() as scratch:
        engine, served, runner = build_engine(Path(model_path), opts, Path(scratch), metrics)
        app = ServingApp(engine, served, metrics, api_key).app
        signal.signal(signal.SIGTERM, lambda *_: engine.stop())
        http, http_thread = start_http(app, opts)
        logger.info(
            "serving %s%s on http://%s:%d/v1 (KV cache %d blocks of %d tokens%s, batch ≤ %d%s)",
            served.name,
            f" and adapters {', '.join(served.adapters)}" if served.adapters else "",
            opts.host,
            opts.port,
            engine.config.num_blocks,
            opts.block_size,
            ", int8" if opts.kv_dtype == "int8" else "",
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
