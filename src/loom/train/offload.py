"""Optimizer offload (ZeRO-Offload style) and its NVMe tier (ZeRO-Infinity style).

`memory.offload=optimizer`: AdamW's state (exp_avg, exp_avg_sq, and an fp32 master copy of
parameters that are not fp32 host tensors) lives in host memory, pinned on a GPU machine, laid
out as one flat buffer per kind; the step runs on the CPU with torch's fused CPU AdamW kernel
over chunks of those buffers, and updated weights are copied back to the device without
waiting (the copies queue ahead of the next forward on the same stream).

`memory.offload_dir`: the same buffers are files, one per kind, read and written in aligned
chunks by a background thread pool that prefetches chunk i+1 while chunk i steps and writes
chunk i-1 back; at most `WINDOW` chunks are in host memory, sized from `memory.host_budget_gb`.

The param groups hold the model's own parameters and `state[p]` holds exp_avg and exp_avg_sq as
views of those buffers (of memory-mapped files in the NVMe tier; DTensors over the local shard
for sharded parameters), so DCP keys them by parameter name exactly as it keys torch's AdamW: a
checkpoint taken with offload resumes without it and back, and loading one writes straight
into the host buffers or files. The files are scratch: they are recreated empty at start-up and
filled from the checkpoint on resume, so a run killed mid-step resumes from its checkpoint.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from loom.core.errors import LoomError

STATE_KINDS = ("exp_avg", "exp_avg_sq")  # checkpointed, under torch AdamW's names
MASTER = "master"  # fp32 weights of parameters that are not fp32 host tensors (not saved)
ALIGN = 1024  # elements: chunks start at 4 KiB multiples of the files
WINDOW = 3  # chunks in host memory at once in the NVMe tier: prefetched, stepping, written back
CHUNK = 1 << 22  # elements per chunk without a budget (16 MiB of each kind)
_FLOAT = 4  # bytes per element: the state is fp32


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly sharded) tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@dataclass(frozen=True)
class _Segment:
    """The elements [start, stop) of one parameter's local tensor, at `offset` in a chunk."""

    group: int
    param: torch.Tensor
    start: int
    stop: int
    offset: int


@dataclass(frozen=True)
class _Chunk:
    start: int  # in the flat state
    stop: int
    segments: tuple[_Segment, ...]


def _chunks(groups: list[list[torch.Tensor]], size: int) -> tuple[list[_Chunk], list[int]]:
    """Cut the flat state (every parameter's local elements, group after group) into chunks of
    `size` elements; returns the chunks and each parameter's offset in the flat state."""
    offsets, spans = [], []
    total = 0
    for g, params in enumerate(groups):
        for p in params:
            offsets.append(total)
            spans.append((g, p, total, total + local(p).numel()))
            total += local(p).numel()
    chunks = []
    for start in range(0, total, size):
        stop = min(start + size, total)
        segments = tuple(
            _Segment(g, p, max(start, a) - a, min(stop, b) - a, max(start, a) - start)
            for g, p, a, b in spans
            if a < stop and b > start
        )
        chunks.append(_Chunk(start, stop, segments))
    return chunks, offsets


class HostStore:
    """Each kind's state in one flat host buffer (pinned when a GPU is there to copy to)."""

    def __init__(self, kinds: Iterable[str], numel: int, pin: bool) -> None:
        self.buffers = {k: torch.zeros(numel, pin_memory=pin) for k in kinds}

    def view(self, kind: str) -> torch.Tensor:
        return self.buffers[kind]

    def stream(self, chunks: list[_Chunk]) -> Iterator[tuple[_Chunk, dict[str, torch.Tensor]]]:
        for chunk in chunks:
            yield chunk, {k: b[chunk.start : chunk.stop] for k, b in self.buffers.items()}

    @property
    def resident_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


class FileStore:
    """Each kind's state in a file under `directory`; chunks stream through `WINDOW` host
    buffers, read ahead and written back by a thread pool (the OS overlaps the I/O with the
    step: `os.preadv`/`os.pwrite` release the GIL)."""

    def __init__(
        self, kinds: Iterable[str], numel: int, directory: Path, chunk: int, pin: bool
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.numel, self.chunk, self.pin = numel, chunk, pin
        self.paths = {k: directory / f"{k}.bin" for k in kinds}
        self.fds: dict[str, int] = {}
        size = -(-numel * _FLOAT // 4096) * 4096
        for kind, path in self.paths.items():
            path.unlink(missing_ok=True)  # scratch: never state left by an earlier process
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            os.ftruncate(fd, size)  # sparse: reads as zeros, AdamW's initial state
            self.fds[kind] = fd
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="loom-offload-io")
        self._buffers: list[dict[str, torch.Tensor]] = []

    def view(self, kind: str) -> torch.Tensor:
        """The whole file as a tensor (memory-mapped: pages come in only when touched)."""
        return torch.from_file(str(self.paths[kind]), shared=True, size=self.numel)

    def stream(self, chunks: list[_Chunk]) -> Iterator[tuple[_Chunk, dict[str, torch.Tensor]]]:
        """Each chunk's state in a host buffer; what the loop body writes there goes back to
        the files. Chunk i+1 is read while chunk i is yielded."""
        if not self._buffers:
            slots = min(WINDOW, len(chunks))
            self._buffers = [
                {k: torch.empty(self.chunk, pin_memory=self.pin) for k in self.paths}
                for _ in range(slots)
            ]
        slots = len(self._buffers)
        reads: dict[int, Future[None]] = {}
        writes: list[Future[None] | None] = [None] * slots

        def read(i: int) -> None:
            pending = writes[i % slots]
            if pending is not None:  # the slot's previous chunk must be on disk first
                pending.result()
                writes[i % slots] = None
            reads[i] = self.pool.submit(self._io, os.preadv, chunks[i], self._buffers[i % slots])

        try:
            if chunks:
                read(0)
            for i, chunk in enumerate(chunks):
                if i + 1 < len(chunks):
                    read(i + 1)
                reads.pop(i).result()
                n = chunk.stop - chunk.start
                yield chunk, {k: b[:n] for k, b in self._buffers[i % slots].items()}
                writes[i % slots] = self.pool.submit(
                    self._io, _pwritev, chunk, self._buffers[i % slots]
                )
        finally:
            for future in [*reads.values(), *writes]:
                if future is not None:
                    future.result()

    def _io(self, call: Any, chunk: _Chunk, buffers: dict[str, torch.Tensor]) -> None:
        n = chunk.stop - chunk.start
        for kind, fd in self.fds.items():
            view = _bytes(buffers[kind], n)
            done, offset = 0, chunk.start * _FLOAT
            while done < len(view):  # a large request may be served in parts
                moved = call(fd, [view[done:]], offset + done)
                if moved <= 0:
                    raise LoomError(f"offload I/O on {self.paths[kind]} stopped at {done} bytes")
                done += moved

    @property
    def resident_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for s in self._buffers for b in s.values())


def _pwritev(fd: int, buffers: list[memoryview], offset: int) -> int:
    return os.pwritev(fd, buffers, offset)


def _bytes(tensor: torch.Tensor, numel: int) -> memoryview:
    """The first `numel` elements of a contiguous host tensor as writable bytes (no copy)."""
    raw = (ctypes.c_char * (numel * tensor.element_size())).from_address(tensor.data_ptr())
    return memoryview(raw).cast("B")


def chunk_for_budget(budget_bytes: int, kinds: int) -> int:
    """Elements per chunk so that `WINDOW` chunks of every kind fit in `budget_bytes`, with
    one chunk more for the step's transients (a gradient chunk copied to the host)."""
    slots = WINDOW * kinds + 1
    size = budget_bytes // (slots * _FLOAT) // ALIGN * ALIGN
    if size < ALIGN:
        need = slots * _FLOAT * ALIGN / 1e9
        raise LoomError(
            f"memory.host_budget_gb={budget_bytes / 1e9:g} is too small for the NVMe tier's "
            f"window ({WINDOW} chunks of {kinds} state kinds and one of gradients, at least "
            f"{need:.4f} GB); raise it"
        )
    return size


class OffloadAdamW(torch.optim.Optimizer):
    """AdamW whose state lives in host memory (or files) and whose step runs on the CPU."""

    def __init__(
        self,
        groups: list[dict[str, Any]],
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        directory: Path | None = None,
        budget_bytes: int = 0,
    ) -> None:
        # torch AdamW's hyper-parameter keys, so each optimizer's checkpoint loads into the other.
        defaults = torch.optim.AdamW([torch.empty(0)], lr=lr, betas=betas, eps=eps).defaults
        super().__init__(groups, defaults)
        params = [p for g in self.param_groups for p in g["params"]]
        on_gpu = any(local(p).device.type != "cpu" for p in params)
        # The step needs fp32 weights on the host; a parameter that is both is its own master.
        self.master = on_gpu or any(p.dtype != torch.float32 for p in params)
        kinds = (*STATE_KINDS, MASTER) if self.master else STATE_KINDS
        pin = on_gpu and torch.cuda.is_available()
        size = chunk_for_budget(budget_bytes, len(kinds)) if budget_bytes else CHUNK
        self.chunks, offsets = _chunks([g["params"] for g in self.param_groups], size)
        numel = self.chunks[-1].stop if self.chunks else 0
        self.store: HostStore | FileStore = (
            FileStore(kinds, numel, directory, size, pin)
            if directory is not None
            else HostStore(kinds, numel, pin)
        )
        self.copy_back_async = on_gpu and isinstance(self.store, HostStore)
        views = {k: self.store.view(k) for k in STATE_KINDS}
        for p, offset in zip(params, offsets, strict=True):
            n = local(p).numel()
            self.state[p] = {"step": torch.zeros((), dtype=torch.float32)}
            for kind, flat in views.items():
                self.state[p][kind] = _shaped_like(p, flat[offset : offset + n])
        self.sync_master()

    @torch.no_grad()
    def sync_master(self) -> None:
        """Master weights from the parameters (at start and after a checkpoint is loaded)."""
        if not self.master:
            return
        for chunk, buffers in self.store.stream(self.chunks):
            for s in chunk.segments:
                master = buffers[MASTER][s.offset : s.offset + s.stop - s.start]
                master.copy_(_flat(s.param)[s.start : s.stop])

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    grads[p] = local(p.grad).reshape(-1)
                    self.state[p]["step"] += 1
        for chunk, buffers in self.store.stream(self.chunks):
            self._step_chunk(chunk, buffers, grads)
        return loss

    def _step_chunk(
        self, chunk: _Chunk, buffers: dict[str, torch.Tensor], grads: dict[torch.Tensor, Any]
    ) -> None:
        by_group: dict[int, list[_Segment]] = {}
        for s in chunk.segments:
            if s.param in grads:
                by_group.setdefault(s.group, []).append(s)
        for g, segments in by_group.items():
            group = self.param_groups[g]
            slices = [slice(s.offset, s.offset + s.stop - s.start) for s in segments]
            grad = [grads[s.param][s.start : s.stop] for s in segments]
            if self.master:
                weights = [buffers[MASTER][i] for i in slices]
                grad = [x.to("cpu", torch.float32) for x in grad]
            else:
                weights = [_flat(s.param)[s.start : s.stop] for s in segments]
            beta1, beta2 = group["betas"]
            torch._fused_adamw_(
                weights,
                grad,
                [buffers["exp_avg"][i] for i in slices],
                [buffers["exp_avg_sq"][i] for i in slices],
                [],
                [self.state[s.param]["step"] for s in segments],
                lr=float(group["lr"]),
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                amsgrad=False,
                maximize=False,
            )
            if self.master:  # the updated weights go back to the parameters
                for s, w in zip(segments, weights, strict=True):
                    _flat(s.param)[s.start : s.stop].copy_(w, non_blocking=self.copy_back_async)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take saved hyper-parameters and state (torch AdamW's layout) into the host buffers
        or files; loading a checkpoint through `state_dict()`'s views already put it there."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise LoomError(
                f"the optimizer state has {len(saved_groups)} parameter groups, this optimizer "
                f"{len(self.param_groups)}; resume with the same model and finetune settings"
            )
        ids = [i for g in saved_groups for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for group, saved in zip(self.param_groups, saved_groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        for i, p in zip(ids, params, strict=True):
            saved_state = state_dict["state"].get(i)
            if saved_state is None:
                continue
            with torch.no_grad():
                self.state[p]["step"].fill_(float(saved_state["step"]))
                for kind in STATE_KINDS:
                    target, value = local(self.state[p][kind]), local(saved_state[kind])
                    if target.data_ptr() != value.data_ptr():
                        target.copy_(value.reshape(target.shape))
        self.sync_master()

    @property
    def host_bytes(self) -> int:
        """Bytes of optimizer state this optimizer holds in host memory right now."""
        return self.store.resident_bytes


def _flat(param: torch.Tensor) -> torch.Tensor:
    return local(param).view(-1)


def _shaped_like(param: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """`flat` with the shape of `param`'s local tensor, a DTensor like `param` if it is one."""
    shard = flat.view(local(param).shape)
    if isinstance(param, DTensor):
        return DTensor.from_local(
            shard,
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )
    return shard
