"""Context parallelism: each sequence split over the `cp` ranks, ring attention over all of it.

Each rank takes 2 of the 2·cp equal chunks of every sequence, chunks r and 2·cp − 1 − r, so
that under the causal mask every rank has the same amount of attention work (the first chunks
attend to few keys, the last to many). Norms, projections, MLP and loss run on the rank's own
tokens only, so their activations fall to 1/cp.

Attention is a ring: each rank's keys and values go round the cp ranks, one hop per step, the
next hop in flight while the current block is computed; each block's partial attention (its
log-sum-exp per query) is merged into the running output by online softmax. Of the 2 × 2
chunk pairs of a (queries, keys) block, pairs wholly above the causal diagonal are skipped, so
every rank computes the same half of the scores. Backward goes round again: the keys and values
travel with their gradients, which arrive home after the last hop. Only this rank's queries,
keys, values, output and log-sum-exp are kept for backward.

The model is untouched: a `ContextParallel` is the attention hook the model already takes for
its key/value caches (`Transformer.forward(..., kv_cache=, positions=)`), and the rotary tables
are read at the rank's own positions. Packed documents (`doc_ids`) are masked per chunk pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from loom.core.loss import cross_entropy
from loom.parallel.compile import ForwardLoss
from loom.parallel.recompute import recomputed_whole

# fp32 attention scores computed at a time: as many as the rank's query elements (a tile's
# scores, exponentials and gradients then stay the size of the layer's own activations), and at
# least MIN_TILE_SCORES (16 MiB); set a number to fix it. Smaller tiles mean more kernel launches
# (and more ops for `--simulate`'s fake tensors) for no saving in peak memory.
TILE_SCORES: int | None = None
MIN_TILE_SCORES = 2**22

# The chunk pairs of one (queries, keys-from-rank-j) block: (query chunk, key chunk, additive
# mask or None for "all visible"). Pairs with nothing visible are left out.
Pairs = list[tuple[int, int, torch.Tensor | None]]


class ContextParallel:
    """This rank's share of each sequence, and ring attention over the whole of it."""

    def __init__(self, mesh: DeviceMesh, seq_len: int) -> None:
        self.group = mesh.get_group()
        self.ranks, self.rank = mesh.size(), mesh.get_local_rank()
        self.chunk = seq_len // (2 * self.ranks)
        self.every_rank = torch.stack(
            [_positions(r, self.ranks, seq_len) for r in range(self.ranks)]
        )
        self.positions = self.every_rank[self.rank]
        self.doc_ids: torch.Tensor | None = None  # every rank's documents of this step's batch
        self.blocks: dict[tuple[torch.device, torch.dtype], list[Pairs]] = {}

    def apply(self, part: nn.Module) -> None:
        """Make `part` (the model or a pipeline stage) attend through this object at this
        rank's positions, from outside its code: a forward pre-hook adds the keywords."""

        def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
            positions = self.positions.to(args[0].device)
            return args, {**kwargs, "kv_cache": self, "positions": positions}

        part.register_forward_pre_hook(hook, with_kwargs=True)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """cp × (this rank's summed loss) / (the sequences' target count): the mean over the cp
        ranks, and the gradient FSDP averages over them, are then the loss of the whole
        sequences, token-weighted (targets of -100 count nowhere)."""
        total = funcol.all_reduce((targets != -100).sum(), "sum", self.group)
        summed = cross_entropy(logits, targets, reduction="sum")
        return summed * (self.ranks / total.clamp_min(1))

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, ...] -> this rank's [batch, seq / cp, ...]."""
        return x[:, self.positions.to(x.device)]

    def begin(self, doc_ids: torch.Tensor | None) -> None:
        """Start a forward pass over a batch with these packed documents (None: one each)."""
        if doc_ids is not None or self.doc_ids is not None:
            self.blocks.clear()
        self.doc_ids = doc_ids

    def attend(
        self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q, k, v [batch, heads, seq / cp, head_dim] of this rank's positions -> attention
        of its queries over every rank's keys, causal by global position."""
        blocks = self._blocks(q.device, q.dtype)
        return _ring_attention(q, k, v, blocks, self)

    def _blocks(self, device: torch.device, dtype: torch.dtype) -> list[Pairs]:
        """For each source rank j, the visible chunk pairs of (my queries, j's keys) and their
        masks; made once per batch and shared by every layer."""
        key = (device, dtype)
        if key not in self.blocks:
            self.blocks[key] = [self._pairs(j, device, dtype) for j in range(self.ranks)]
        return self.blocks[key]

    def _pairs(self, source: int, device: torch.device, dtype: torch.dtype) -> Pairs:
        """Chunk i sees all of an earlier chunk, the causal triangle of itself, nothing of a
        later one (decided from the chunk indices, not from tensor values, so that a fake-tensor
        simulation takes the same path); packed documents add their mask to each pair."""
        mine, theirs = self.positions.view(2, -1), self.every_rank[source].view(2, -1)
        order = [self.rank, 2 * self.ranks - 1 - self.rank]
        other = [source, 2 * self.ranks - 1 - source]
        pairs: Pairs = []
        for a in range(2):
            for c in range(2):
                if order[a] < other[c]:
                    continue
                visible = None
                if order[a] == other[c]:
                    visible = torch.ones(self.chunk, self.chunk, dtype=torch.bool).tril()
                    visible = visible.to(device)[None]
                if self.doc_ids is not None:
                    docs = self.doc_ids.to(device)
                    same = docs[:, mine[a], None] == docs[:, None, theirs[c]]
                    visible = same if visible is None else same & visible
                mask = None
                if visible is not None:
                    blocked = torch.zeros(visible.shape, dtype=torch.float32, device=device)
                    mask = blocked.masked_fill_(~visible, float("-inf"))
                pairs.append((a, c, mask))
        return pairs


def _positions(rank: int, ranks: int, seq_len: int) -> torch.Tensor:
    chunk = seq_len // (2 * ranks)
    first, second = rank * chunk, (2 * ranks - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


@dataclass
class _Ring:
    """Who sends to whom: rank r to r + 1."""

    group: Any
    ranks: int

    def shift(self, x: torch.Tensor) -> torch.Tensor:
        """Send `x` one hop round the ring (returned at once; it waits when first read)."""
        ring = [(r + 1) % self.ranks for r in range(self.ranks)]
        flat = funcol.permute_tensor(x.contiguous().flatten(), ring, self.group)
        return flat.view(x.shape)


@torch.compiler.disable
def _ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    blocks: list[Pairs],
    context: ContextParallel,
) -> torch.Tensor:
    ring = _Ring(context.group, context.ranks)
    return _RingAttention.apply(q, k, v, blocks, ring, context.rank)


class _RingAttention(torch.autograd.Function):
    """Attention of this rank's queries over the keys and values of every rank, passed round
    the ring; fp32 inside whatever the inputs' dtype."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        blocks: list[Pairs],
        ring: _Ring,
        rank: int,
    ) -> torch.Tensor:
        with torch.autocast(q.device.type, enabled=False), recomputed_whole():
            return _RingAttention._forward(ctx, q, k, v, blocks, ring, rank)

    @staticmethod
    def _forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        blocks: list[Pairs],
        ring: _Ring,
        rank: int,
    ) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        scale = 1.0 / math.sqrt(q.shape[-1])
        query = _grouped(q.float(), groups)  # [b, kv heads, groups, seq, d]
        widths = [k.shape[-1], v.shape[-1]]  # (latent attention's value heads are narrower)
        out = query.new_zeros(*query.shape[:-1], widths[1])
        lse = torch.full(query.shape[:-1], float("-inf"), device=q.device)
        kv = torch.cat((k, v), dim=-1)
        for step in range(ring.ranks):
            coming = ring.shift(kv) if step < ring.ranks - 1 else None
            keys, values = kv.float().unsqueeze(2).split(widths, dim=-1)  # [b, kvh, 1, seq, d]
            for a, c, mask in blocks[(rank - step) % ring.ranks]:
                kc, vc = _chunk(keys, c), _chunk(values, c)
                for rows, qt in _tiles(_chunk(query, a), kc):
                    scores = qt @ kc.transpose(-1, -2) * scale + _mask(mask, rows)
                    top = scores.amax(-1, keepdim=True)
                    top = torch.where(top.isinf(), torch.zeros_like(top), top)
                    probs = (scores - top).exp()
                    total = probs.sum(-1, keepdim=True)
                    part_lse = (top + total.log()).squeeze(-1)
                    part_out = (probs @ vc) / total.clamp_min(torch.finfo(total.dtype).tiny)
                    out_t, lse_t = _chunk(out, a)[..., rows, :], _chunk(lse, a, dim=-1)[..., rows]
                    _merge(out_t, lse_t, part_out, part_lse)
            if coming is not None:
                kv = coming
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.blocks, ctx.ring, ctx.rank, ctx.scale, ctx.widths = blocks, ring, rank, scale, widths
        return out.flatten(1, 2).to(q.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        with torch.autocast(grad_out.device.type, enabled=False):
            return _RingAttention._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        ring, scale = ctx.ring, ctx.scale
        groups = q.shape[1] // k.shape[1]
        query = _grouped(q.float(), groups)
        d_out = _grouped(grad_out.float(), groups)
        delta = (d_out * out).sum(-1, keepdim=True)  # rowsum(dO ∘ O)
        d_query = torch.zeros_like(query)
        kv = torch.cat((k, v), dim=-1)
        d_kv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        for step in range(ring.ranks):
            coming = ring.shift(kv) if step < ring.ranks - 1 else None
            keys, values = kv.float().unsqueeze(2).split(ctx.widths, dim=-1)
            d_keys, d_values = d_kv.split(ctx.widths, dim=-1)
            for a, c, mask in ctx.blocks[(ctx.rank - step) % ring.ranks]:
                kc, vc, dk, dv = (_chunk(x, c) for x in (keys, values, d_keys, d_values))
                for rows, qt in _tiles(_chunk(query, a), kc):
                    do_t = _chunk(d_out, a)[..., rows, :]
                    lse_t = _chunk(lse, a, dim=-1)[..., rows, None]
                    scores = qt @ kc.transpose(-1, -2) * scale + _mask(mask, rows)
                    probs = (scores - lse_t).exp()
                    dv.add_((probs.transpose(-1, -2) @ do_t).sum(2))
                    delta_t = _chunk(delta, a)[..., rows, :]
                    d_scores = probs * (do_t @ vc.transpose(-1, -2) - delta_t)
                    _chunk(d_query, a)[..., rows, :].add_(d_scores @ kc * scale)
                    dk.add_((d_scores.transpose(-1, -2) @ qt).sum(2) * scale)
            d_kv = ring.shift(d_kv)  # after the last hop each gradient is home
            if coming is not None:
                kv = coming
        d_k, d_v = d_kv.split(ctx.widths, dim=-1)
        d_q = d_query.flatten(1, 2).to(q.dtype)
        return d_q, d_k.to(k.dtype), d_v.to(v.dtype), None, None, None


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, heads, seq, d] -> [b, kv heads, groups, seq, d] (query heads sharing a kv head)."""
    batch, heads, seq, dim = x.shape
    return x.view(batch, heads // groups, groups, seq, dim)


def _chunk(x: torch.Tensor, index: int, dim: int = -2) -> torch.Tensor:
    """Chunk `index` (0 or 1) of the rank's two sequence chunks, as a view."""
    return x.chunk(2, dim=dim)[index]


def _mask(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | float:
    """Rows of [batch or 1, q, k] -> broadcastable over [b, kv heads, groups, rows, k]."""
    return 0.0 if mask is None else mask[:, None, None, rows]


def _tiles(query: torch.Tensor, keys: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
    """The query chunk in tiles of rows whose scores against `keys` stay near TILE_SCORES
    elements: a long sequence's [chunk × chunk] scores (and their exponentials and
    gradients) would otherwise be the largest tensors of the step."""
    budget = TILE_SCORES or max(MIN_TILE_SCORES, 2 * query.numel())  # 2 chunks: the rank's
    per_row = query[..., 0, 0].numel() * keys.shape[-2]
    step = max(1, budget // per_row)
    for start in range(0, query.shape[-2], step):
        rows = slice(start, start + step)
        yield rows, query[..., rows, :]


def _merge(
    out: torch.Tensor, lse: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor
) -> None:
    """Fold a block's normalised output and log-sum-exp into the running ones, in place."""
    new = torch.logaddexp(lse, part_lse)
    safe = torch.where(new.isinf(), torch.zeros_like(new), new)
    out.mul_((lse - safe).exp().unsqueeze(-1)).add_(part_out * (part_lse - safe).exp()[..., None])
    lse.copy_(new)


def context_parallel_loss(
    model: Callable[..., torch.Tensor], context: ContextParallel
) -> ForwardLoss:
    """inputs, targets[, doc_ids] of whole sequences -> `ContextParallel.loss` of this
    rank's share (the model attends through `context`, see `ContextParallel.apply`)."""

    def run(
        inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        context.begin(doc_ids)
        return context.loss(model(context.shard(inputs)), context.shard(targets))

    return run
