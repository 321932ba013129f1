"""Activation offload: each block's saved activations wait in host memory until its backward.

Applied from outside the model, after recomputation: a block's forward runs under autograd's
saved-tensor hooks, which copy every saved activation into a host store (pinned memory, on a
side CUDA stream, so the copy overlaps the next block's compute) and let the device copy go.
In backward, the first unpack of a block brings all of its tensors back and starts bringing the
previous block's, so each copy overlaps the backward of the block after it.

What moves is what the block keeps for backward: with `recompute=full` only the block's input;
with `selective` its input and the matmul and attention outputs torch's selective checkpoint
caches; with none everything. Parameters, buffers (their views too), tensor subclasses
(DTensor, float8) and tensors under MIN_BYTES stay where they are. On a CPU the same path runs
(host and device memory are one), so the store's counters show what would move on a GPU.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import is_traceable_wrapper_subclass
from torch.utils._pytree import tree_leaves

from loom.models.llama import Transformer

# Below this a copy costs more in launches than it frees (per-token norms' statistics, masks).
MIN_BYTES = 16 * 1024

Key = tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype]


class _Saved:
    """One saved activation: its host copy from forward until its last unpack in backward."""

    def __init__(self, store: ActivationStore, group: _Group, host: torch.Tensor) -> None:
        self.store = store
        self.group = group
        self.host: torch.Tensor | None = host
        self.on_device: torch.Tensor | None = None
        self.nbytes = host.numel() * host.element_size()
        self.uses = 1  # autograd may save one tensor several times (q, k and v take one input)

    def release(self) -> None:
        if self.host is not None:
            self.store.held_bytes -= self.nbytes
        self.host = self.on_device = None

    def __del__(self) -> None:  # a graph dropped without a backward
        self.release()


class _Group:
    """The tensors one block's forward saved."""

    def __init__(self) -> None:
        # Forward only: tensors already copied, held so that their addresses are not reused.
        self.seen: dict[Key, tuple[torch.Tensor, _Saved]] | None = {}
        self.members: list[weakref.ref[_Saved]] = []
        self.fetched = False
        self.ready: torch.cuda.Event | None = None

    def alive(self) -> list[_Saved]:
        return [s for ref in self.members if (s := ref()) is not None and s.host is not None]


class ActivationStore:
    """The host store of one model's saved activations, and its counters (bytes)."""

    def __init__(self, device: torch.device, min_bytes: int = MIN_BYTES) -> None:
        self.device = device
        self.min_bytes = min_bytes
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.groups: list[_Group] = []  # in forward order
        self.current: _Group | None = None
        self.resident: set[int] | None = None  # storages of parameters and buffers
        self._block: nn.Module | None = None
        self._part: nn.Module | None = None
        self.held_bytes = 0  # in the store now
        self.peak_held_bytes = 0  # most held since reset_counters
        self.offloaded_bytes = 0  # copied into the store since reset_counters

    def reset_counters(self) -> None:
        self.offloaded_bytes = 0
        self.peak_held_bytes = self.held_bytes

    # -- forward ------------------------------------------------------------------------

    def open(self, block: nn.Module, part: nn.Module) -> None:
        """Start the group of `block`'s forward."""
        self.groups = [g for g in self.groups if g.alive()]
        self.current = _Group()
        self.groups.append(self.current)
        self._block, self._part = block, part
        self.resident = None

    def close(self) -> None:
        if self.current is not None:
            self.current.seen = None
        self.current = None

    def pack(self, tensor: torch.Tensor) -> torch.Tensor | _Saved:
        group = self.current
        if (
            group is None
            or group.seen is None
            or not _plain(tensor)
            or tensor.numel() * tensor.element_size() < self.min_bytes
            or _storage(tensor) in self._resident()
        ):
            return tensor
        key = (
            _storage(tensor),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if key in group.seen:
            saved = group.seen[key][1]
            saved.uses += 1
            return saved
        with torch.no_grad():
            host = torch.empty_like(tensor, device="cpu", pin_memory=self.cuda)
            if self.stream is not None:
                self.stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self.stream):
                    host.copy_(tensor, non_blocking=True)
                tensor.record_stream(self.stream)
            else:
                host.copy_(tensor)
        saved = _Saved(self, group, host)
        group.seen[key] = (tensor, saved)
        group.members.append(weakref.ref(saved))
        self.held_bytes += saved.nbytes
        self.offloaded_bytes += saved.nbytes
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        return saved

    def _resident(self) -> set[int]:
        """Storages of the block's parameters and the model's buffers, taken inside the
        forward, where FSDP has gathered the parameters the block's matmuls save."""
        if self.resident is None:
            assert self._block is not None and self._part is not None
            tensors = [*self._block.parameters(), *self._part.buffers()]
            self.resident = {_storage(t) for t in tensors if _plain(t)}
        return self.resident

    # -- backward -----------------------------------------------------------------------

    def unpack(self, packed: torch.Tensor | _Saved) -> torch.Tensor:
        if not isinstance(packed, _Saved):
            return packed
        group = packed.group
        if not group.fetched:
            self._fetch(group)
            earlier = [g for g in self.groups[: self.groups.index(group)] if not g.fetched]
            if earlier and self.cuda:
                self._fetch(earlier[-1])  # the block whose backward comes next
        if group.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(group.ready)
        tensor = packed.on_device
        assert tensor is not None, "a saved activation was unpacked after its last use"
        if self.cuda:
            tensor.record_stream(torch.cuda.current_stream(self.device))
        packed.uses -= 1
        if packed.uses == 0:
            packed.release()
        return tensor

    def _fetch(self, group: _Group) -> None:
        group.fetched = True
        members = group.alive()
        if self.stream is None:
            for saved in members:  # on a CPU the host copy is used as it is
                assert saved.host is not None
                saved.on_device = saved.host.to(self.device)
            return
        with torch.cuda.stream(self.stream):
            for saved in members:
                assert saved.host is not None
                saved.on_device = saved.host.to(self.device, non_blocking=True)
            group.ready = torch.cuda.Event()
            group.ready.record(self.stream)


def _storage(tensor: torch.Tensor) -> int:
    """The identity of a tensor's storage (its StorageImpl; fake tensors' have no address)."""
    return tensor.untyped_storage()._cdata


def _plain(tensor: torch.Tensor) -> bool:
    """A tensor whose bytes are its own, not a wrapper of others (DTensor, float8)."""
    return not is_traceable_wrapper_subclass(tensor)


class _SelectiveCache(defaultdict):  # type: ignore[type-arg]
    """Storage for torch's selective-checkpoint modes whose cached op outputs (kept outside
    autograd's saved tensors, so the hooks never see them) go through the store as well."""

    def __init__(self, store: ActivationStore) -> None:
        super().__init__(partial(_SelectiveEntries, store))


class _SelectiveEntries(dict):  # type: ignore[type-arg]
    def __init__(self, store: ActivationStore) -> None:
        super().__init__()
        self.store = store

    def __setitem__(self, index: int, entry: Any) -> None:
        for leaf in tree_leaves(entry):  # _VersionWrapper(op output) or a marker
            value = getattr(leaf, "val", None)
            if isinstance(value, torch.Tensor) and leaf.version == 0:
                leaf.val = self.store.pack(value)
        super().__setitem__(index, entry)

    def get(self, index: int, default: Any = None) -> Any:
        entry = super().get(index, default)
        for leaf in tree_leaves(entry):
            if isinstance(getattr(leaf, "val", None), _Saved):
                leaf.val = self.store.unpack(leaf.val)
        return entry


def _offload_selective_cache(block: CheckpointWrapper, store: ActivationStore) -> None:
    make = block.checkpoint_fn.keywords.get("context_fn")  # type: ignore[union-attr]
    if make is None:  # full recomputation: the block keeps only its input
        return

    def contexts() -> tuple[Any, Any]:
        caching, cached = make()
        caching.storage = cached.storage = _SelectiveCache(store)
        return caching, cached

    block.checkpoint_fn = partial(block.checkpoint_fn, context_fn=contexts)


def apply_activation_offload(part: Transformer, store: ActivationStore) -> None:
    """Run each block's forward of `part` (recompute-wrapped or not) under the store's hooks;
    hooks on the blocks themselves, so parameter names are unchanged."""
    hooks = torch.autograd.graph.saved_tensors_hooks(store.pack, store.unpack)

    def enter(block: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            store.open(block, part)
            hooks.__enter__()

    def leave(block: nn.Module, args: Any, output: Any) -> None:
        if store.current is not None:
            store.close()
            hooks.__exit__(None, None, None)

    for block in part.layers.values():
        if isinstance(block, CheckpointWrapper):
            _offload_selective_cache(block, store)
        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave, always_call=True)
