"""`loom serve --tp N`: one model sharded over N local worker processes with the training
tensor-parallel plan (heads and MLP columns split, one all-reduce per block).

The server process is rank 0: it schedules, and before every forward pass broadcasts the step
(tokens, positions, cache layout) to the other ranks, which run the same pass on their shard
and their share of the KV cache. All ranks end with the full logits; rank 0 samples. Workers
exit when rank 0 says so, or when it disappears.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from loom.core.distributed import all_reduce, broadcast_object
from loom.core.errors import LoomError
from loom.core.log import logger, setup_logging
from loom.models.llama import Transformer
from loom.parallel.tensor import apply_tensor_parallel
from loom.serve.engine import StepBatch
from loom.serve.kv_cache import PagedKVCache
from loom.serve.runner import RunnerSetup, kv_blocks, load_served_model, new_cache, run_step

# Serving waits for requests for as long as it likes; the workers wait in a broadcast meanwhile.
IDLE_TIMEOUT = timedelta(days=365)


class TensorParallelRunner:
    """Rank 0's runner: broadcast the step, then run this rank's share of it."""

    def __init__(
        self,
        model: Transformer,
        cache: PagedKVCache,
        device: torch.device,
        workers: list[subprocess.Popen],
        num_blocks: int,
    ) -> None:
        self.model, self.cache, self.device = model, cache, device
        self.workers = workers
        self.num_blocks = num_blocks

    @torch.no_grad()
    def forward(self, batch: StepBatch) -> torch.Tensor:
        broadcast_object(batch)
        return run_step(self.model, self.cache, batch, self.device)

    def close(self) -> None:
        broadcast_object(None)
        for worker in self.workers:
            worker.wait(timeout=60)
        dist.destroy_process_group()


def _device(rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _untie(model: Transformer) -> None:
    """Give a tied model its own output projection: the plan shards the embedding by rows and
    the output projection by columns, which one shared tensor cannot be."""
    if model.lm_head is None:
        assert model.embed_tokens is not None
        weight = model.embed_tokens.weight
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
        head.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        model.lm_head = head


def shard_model(
    src: Path, setup: RunnerSetup, scratch: Path, device: torch.device
) -> tuple[Transformer, Path]:
    """This rank's shard of the model, and the tokenizer folder."""
    model, tokenizer_dir, _ = load_served_model(src, setup, device, scratch)
    cfg = model.cfg
    if cfg.n_heads % setup.tp or cfg.n_kv_heads % setup.tp:
        raise LoomError(
            f"--tp {setup.tp} must divide the model's {cfg.n_heads} attention heads and "
            f"{cfg.n_kv_heads} key/value heads"
        )
    _untie(model)
    mesh = init_device_mesh(device.type, (setup.tp,))
    apply_tensor_parallel(model, mesh, sequence_parallel=False, loss_parallel=False)
    return model, tokenizer_dir


def _join(rank: int, world: int, port: int, device: torch.device) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=IDLE_TIMEOUT)


def _agreed_blocks(model: Transformer, setup: RunnerSetup, device: torch.device) -> int:
    """The smallest cache any rank can hold (every rank mirrors the same block tables)."""
    mine = kv_blocks(model, setup, device)
    return -int(all_reduce(torch.tensor(-mine, device=device), op="max"))


def start_tp_runner(
    src: Path, setup: RunnerSetup, scratch: Path
) -> tuple[TensorParallelRunner, Transformer, Path, dict[str, int]]:
    """Start ranks 1..tp-1 as worker processes, join them as rank 0, shard the model."""
    if setup.adapters or setup.quantize:
        raise LoomError(
            "--tp > 1 serves a plain model: --adapter and --quantize are single-process options "
            "(merge the adapters into the model with `loom convert --merge` first)"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loom.serve.tensor_parallel",
                str(src),
                setup.to_json(),
                str(rank),
                str(port),
                str(os.getpid()),
            ]
        )
        for rank in range(1, setup.tp)
    ]
    device = _device(0)
    _join(0, setup.tp, port, device)
    model, tokenizer_dir = shard_model(src, setup, scratch, device)
    num_blocks = _agreed_blocks(model, setup, device)
    cache = new_cache(model, setup, num_blocks, device)
    runner = TensorParallelRunner(model, cache, device, workers, num_blocks)
    return runner, model, tokenizer_dir, {}


def _exit_with(parent: int) -> None:
    """Leave when the server process is gone (its broadcasts would never come)."""
    while True:
        time.sleep(1)
        if os.getppid() != parent:
            os._exit(1)


def worker_main(argv: list[str]) -> None:
    src, options, rank, port, parent = argv
    setup_logging(quiet=True)
    threading.Thread(target=_exit_with, args=(int(parent),), daemon=True).start()
    setup = RunnerSetup.from_json(options)
    device = _device(int(rank))
    _join(int(rank), setup.tp, int(port), device)
    with tempfile.TemporaryDirectory() as scratch:
        model, _ = shard_model(Path(src), setup, Path(scratch), device)
        cache = new_cache(model, setup, _agreed_blocks(model, setup, device), device)
        with torch.no_grad():
            while (batch := broadcast_object(None)) is not None:
                assert isinstance(batch, StepBatch)
                run_step(model, cache, batch, device)
    dist.destroy_process_group()
    logger.debug("tensor-parallel worker %s done", rank)


if __name__ == "__main__":
    worker_main(sys.argv[1:])
