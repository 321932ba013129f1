"""A paged key/value cache: memory in fixed-size blocks, handed to sequences as they grow.

A sequence holds a list of block ids (its block table) instead of a slab sized for the longest
possible sequence, so the memory of a short answer is free for other requests and a finished
sequence's blocks go straight back to the pool. One engine step packs many sequences in one row
of tokens; `StepLayout` says where each token's keys go and which keys each query sees.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loom.core.errors import LoomError


class BlockAllocator:
    """The pool of block ids, with a prefix cache: a full block whose keys and values are
    computed can be registered under the hash of its tokens and everything before them; a
    later sequence with the same prefix takes it (reference counted) instead of recomputing it.
    A released block with a hash stays cached until its memory is needed (least recently used
    first), so a finished request's prompt still serves the next one."""

    def __init__(self, num_blocks: int, prefix_cache: bool = True) -> None:
        if num_blocks < 1:
            raise LoomError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.prefix_cache = prefix_cache
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}  # registered block → its prefix hash
        self._block_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unused: oldest first

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: empty ones and cached ones no sequence uses."""
        return len(self._free) + len(self._idle)

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise LoomError(f"{n} KV blocks asked for, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently used cached block
                block, _ = self._idle.popitem(last=False)
                del self._block_of[self._hash_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Release a sequence's blocks: cached ones stay cached (the latest most recent)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            if block in self._hash_of:
                self._idle[block] = None
            else:
                self._free.append(block)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks of the longest run of `hashes` from the start, now also used by
        the caller (release them with `free`)."""
        found = []
        for h in hashes:
            block = self._block_of.get(h)
            if block is None:
                break
            if not self._refs[block]:
                del self._idle[block]
            self._refs[block] += 1
            found.append(block)
        return found

    def register(self, block: int, prefix_hash: bytes) -> None:
        """`block` (full, computed) holds the tokens `prefix_hash` names; a prefix already
        cached in another block keeps that one."""
        if self.prefix_cache and prefix_hash not in self._block_of and block not in self._hash_of:
            self._block_of[prefix_hash] = block
            self._hash_of[block] = prefix_hash


def block_hashes(tokens: list[int], block_size: int, salt: int, parent: bytes = b"") -> list[bytes]:
    """Hashes of the full blocks of `tokens`, each over its tokens and the hash before it (the
    first over `salt`: what else decides the keys, e.g. the adapter)."""
    hashes = []
    previous = parent or salt.to_bytes(8, "little", signed=True)
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = array("q", tokens[start : start + block_size]).tobytes()
        previous = hashlib.blake2b(previous + block, digest_size=16).digest()
        hashes.append(previous)
    return hashes


@dataclass
class PrefillChunk:
    """`length` prompt tokens starting at row index `start`, after `context` cached tokens;
    `blocks` [n] are the sequence's blocks covering context + length."""

    start: int
    length: int
    context: int
    blocks: torch.Tensor


@dataclass
class StepLayout:
    """Where the tokens of one packed row live in the cache, shared by every layer.

    `write_slots` [T]: the cache slot of each token's key/value. Decoding sequences (one query
    each) are attended together: `decode_rows` [B] their row indices, `decode_blocks` [B, n]
    their block tables (padded), `decode_lengths` [B] how many keys each sees. Prompt chunks
    are attended one by one (a causal mask offset by the cached context)."""

    write_slots: torch.Tensor
    decode_rows: torch.Tensor
    decode_blocks: torch.Tensor
    decode_lengths: torch.Tensor
    chunks: list[PrefillChunk]

    def to(self, device: torch.device) -> StepLayout:
        return StepLayout(
            self.write_slots.to(device),
            self.decode_rows.to(device),
            self.decode_blocks.to(device),
            self.decode_lengths.to(device),
            [PrefillChunk(c.start, c.length, c.context, c.blocks.to(device)) for c in self.chunks],
        )


KV_DTYPES = ("auto", "int8")  # `--kv-dtype`: the model's dtype, or int8 codes with scales
SCALE_BYTES = 4  # an int8 cache's fp32 scale per token, head, and key or value


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectors [..., head_dim] → int8 codes [..., head_dim] and fp32 scales [...]: symmetric,
    one scale per vector (a token's key or value in one head), its largest magnitude over 127.
    Each element is off by at most half a step, scale / 2 = max |x| / 254."""
    x = x.float()
    scale = x.abs().amax(-1).div_(127)
    codes = torch.div(x, scale.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).round_()
    return codes.clamp_(-127, 127).to(torch.int8), scale


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.mul(codes, scale[..., None]).to(dtype)  # (int8 × fp32: fp32)


class PagedKVCache:
    """Keys and values of all layers as [blocks, block_size, kv_heads, head_dim] per layer.

    `kv_heads` is what this process holds (under tensor parallelism, its share of the heads).
    Set `layout` before each forward pass; `attend` is called by every attention layer.

    `kv_dtype` "auto" stores them in `dtype` (the model's); "int8" stores int8 codes and one
    fp32 scale per token and head (`quantize_kv`), quantized as they are written and
    dequantized to `dtype` when a step gathers its blocks, so attention itself is unchanged.
    Every key and value a query sees then comes from the cache, its own chunk's included: a
    sequence's logits do not depend on how its prompt was chunked or found in the prefix
    cache."""

    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        kv_dtype: str = "auto",
    ) -> None:
        if kv_dtype not in KV_DTYPES:
            raise LoomError(f"kv_dtype {kv_dtype!r}: use one of {', '.join(KV_DTYPES)}")
        shape = (n_layers, num_blocks, block_size, kv_heads, head_dim)
        self.quantized = kv_dtype == "int8"
        store = torch.int8 if self.quantized else dtype
        self.keys = torch.zeros(shape, device=device, dtype=store)
        self.values = torch.zeros(shape, device=device, dtype=store)
        self.key_scales: torch.Tensor | None = None
        self.value_scales: torch.Tensor | None = None
        if self.quantized:
            self.key_scales = torch.zeros(shape[:-1], device=device, dtype=torch.float32)
            self.value_scales = torch.zeros(shape[:-1], device=device, dtype=torch.float32)
        self.dtype = dtype
        self.block_size = block_size
        self.layout: StepLayout | None = None

    @staticmethod
    def bytes_per_block(
        n_layers: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype_bytes: int,
        kv_dtype: str = "auto",
    ) -> int:
        """Bytes of one block over all layers, keys and values (int8: codes and scales)."""
        per_vector = head_dim + SCALE_BYTES if kv_dtype == "int8" else head_dim * dtype_bytes
        return 2 * n_layers * block_size * kv_heads * per_vector

    @property
    def nbytes(self) -> int:
        stores = (self.keys, self.values, self.key_scales, self.value_scales)
        return sum(t.nbytes for t in stores if t is not None)

    def _gather(
        self, store: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor
    ) -> torch.Tensor:
        """Blocks [..., n] of one layer's store → [..., kv_heads, n·block_size, head_dim]."""
        # (index_select: several times faster than indexing by a 2-d tensor on the CPU)
        flat = blocks.reshape(-1)
        got = store.index_select(0, flat).view(*blocks.shape, *store.shape[1:])
        if scales is not None:  # [..., n, block_size, kv_heads]
            got_scales = scales.index_select(0, flat).view(*blocks.shape, *scales.shape[1:])
            got = dequantize_kv(got, got_scales, self.dtype)
        got = got.flatten(-4, -3)  # [..., n·block_size, kv_heads, head_dim]
        return got.transpose(-3, -2)

    def _write(self, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keys and values [slot, kv_heads, head_dim] into one layer's stores at `slots` (int8:
        both quantized in one go, a step's small tensors being dominated by per-call costs)."""
        keys, values = self.keys[layer_id], self.values[layer_id]
        flat_keys, flat_values = keys.view(-1, *keys.shape[2:]), values.view(-1, *keys.shape[2:])
        if self.key_scales is None or self.value_scales is None:
            flat_keys.index_copy_(0, slots, k)
            flat_values.index_copy_(0, slots, v)
            return
        codes, scale = quantize_kv(torch.stack((k, v)))
        flat_keys.index_copy_(0, slots, codes[0])
        flat_values.index_copy_(0, slots, codes[1])
        self.key_scales[layer_id].view(-1, keys.shape[2]).index_copy_(0, slots, scale[0])
        self.value_scales[layer_id].view(-1, keys.shape[2]).index_copy_(0, slots, scale[1])

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        layout = self.layout
        assert layout is not None, "set the cache's layout before the forward pass"
        keys, values = self.keys[layer_id], self.values[layer_id]
        k_scales = None if self.key_scales is None else self.key_scales[layer_id]
        v_scales = None if self.value_scales is None else self.value_scales[layer_id]
        # q, k, v: [1, heads, T, head_dim]; the cache stores [slot, kv_heads, head_dim].
        self._write(layer_id, layout.write_slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
        out = torch.empty_like(q)
        if layout.decode_rows.numel():
            rows = layout.decode_rows
            dq = q[0, :, rows].transpose(0, 1).unsqueeze(2)  # [B, heads, 1, head_dim]
            dk = self._gather(keys, k_scales, layout.decode_blocks)  # [B, kv_heads, L, head_dim]
            dv = self._gather(values, v_scales, layout.decode_blocks)
            seen = torch.arange(dk.shape[2], device=q.device) < layout.decode_lengths[:, None]
            att = F.scaled_dot_product_attention(
                dq, dk, dv, attn_mask=seen[:, None, None, :], enable_gqa=True
            )
            out[0, :, rows] = att.squeeze(2).transpose(0, 1)
        for chunk in layout.chunks:
            end = chunk.context + chunk.length
            ck = self._gather(keys, k_scales, chunk.blocks)[:, :end].unsqueeze(0)
            cv = self._gather(values, v_scales, chunk.blocks)[:, :end].unsqueeze(0)
            cq = q[:, :, chunk.start : chunk.start + chunk.length]
            mask = None
            if chunk.context:  # query i (at context + i) sees keys up to context + i
                q_pos = torch.arange(chunk.context, end, device=q.device)
                mask = q_pos[:, None] >= torch.arange(end, device=q.device)[None, :]
            out[:, :, chunk.start : chunk.start + chunk.length] = F.scaled_dot_product_attention(
                cq, ck, cv, attn_mask=mask, is_causal=mask is None, enable_gqa=True
            )
        return out
