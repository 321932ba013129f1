"""Ring attention against full attention on every rank, in one torchrun launch.

    torchrun --standalone --nproc-per-node N tests/ring_attention_ranks.py OUT_DIR

For cp = N and (when N is even and above 2) cp = 2 on a sub-mesh, with and without packed
documents (and with queries in small tiles, and value heads narrower than key heads), each
rank writes OUT_DIR/rank<R>.json: {case: [output, dq, dk, dv] max |error|} against
`scaled_dot_product_attention` of the whole sequence (fp32, grouped-query heads).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

from loom.models.llama import document_mask
from loom.parallel import context
from loom.parallel.context import ContextParallel


def errors(
    cp: ContextParallel, doc_ids: torch.Tensor | None, seq: int, values: int = 8
) -> list[float]:
    """`values`: the value head width (latent attention's is narrower than its keys')."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 4, seq, 8), (2, 2, seq, 8), (2, 2, seq, values), (2, 4, seq, values)]
    q, k, v, grad = (torch.randn(shape, generator=generator) for shape in shapes)
    whole = [x.clone().requires_grad_() for x in (q, k, v)]
    mask = None if doc_ids is None else document_mask(doc_ids, torch.float32)
    ref = F.scaled_dot_product_attention(
        *whole, attn_mask=mask, is_causal=mask is None, enable_gqa=True
    )
    (ref * grad).sum().backward()
    cp.begin(doc_ids)
    mine = cp.positions
    local = [x[:, :, mine].clone().requires_grad_() for x in (q, k, v)]
    out = cp.attend(0, *local)
    (out * grad[:, :, mine]).sum().backward()
    diffs = [out - ref[:, :, mine]]
    diffs += [a.grad - b.grad[:, :, mine] for a, b in zip(local, whole, strict=True)]
    return [d.abs().max().item() for d in diffs]


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    seq = 48
    # documents of uneven lengths, boundaries inside chunks; the second row is one document
    docs = torch.tensor([[0] * 5 + [1] * 19 + [2] * 11 + [3] * 13, [0] * seq])
    meshes = {f"cp{world}": init_device_mesh("cpu", (world,), mesh_dim_names=("cp",))}
    if world > 2 and world % 2 == 0:
        grid = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "cp"))
        meshes["cp2"] = grid
    results = {}
    for name, mesh in meshes.items():
        cp = ContextParallel(mesh["cp"], seq)
        results[f"{name}_causal"] = errors(cp, None, seq)
        results[f"{name}_documents"] = errors(cp, docs, seq)
    context.TILE_SCORES = 40  # queries a few rows at a time (long sequences' tiling)
    results[f"{name}_documents_tiled"] = errors(cp, docs, seq)  # the last mesh's
    results[f"{name}_narrow_values"] = errors(cp, None, seq, values=6)
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
