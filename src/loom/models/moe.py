"""A mixture-of-experts layer in plain PyTorch (Mixtral, Qwen-MoE): a softmax router sends each
token to its top-k SwiGLU experts, optionally beside a shared MLP every token goes through.

Dispatch sorts the (token, expert) assignments by expert and runs all experts as one batched
matmul over per-expert groups padded to the largest group (dropless) or to the capacity
(`capacity_factor`); there is no Python loop over experts. Balancing is either the
Switch-Transformer auxiliary loss, whose gradient is added in backward without changing the
model's output or its loss value, or DeepSeek-V3's bias on the routing scores (selection only),
moved after each optimizer step by `update_balance_bias`. Each layer keeps the counts of its
last forward pass (tokens per expert, dropped tokens, the balance loss) for metrics.

Names follow transformers' in-memory layout (`mlp.gate.weight`, `mlp.experts.gate_up_proj`
[experts, 2·hidden, dim], `mlp.experts.down_proj` [experts, dim, hidden]).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from loom.core.model_config import ModelConfig


class Experts(nn.Module):
    """Every expert's SwiGLU weights as 3-D tensors, applied to groups of equal length."""

    def __init__(self, experts: int, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(experts, dim, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [experts, tokens, dim] -> [experts, tokens, dim]."""
        return expert_ffn(x, self.gate_up_proj, self.down_proj)


def expert_ffn(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Each expert's SwiGLU on its own group of tokens, as two batched matmuls."""
    gate, up = torch.bmm(x, gate_up.transpose(1, 2)).chunk(2, dim=-1)
    return torch.bmm(F.silu(gate) * up, down.transpose(1, 2))


class _AddAuxLossGradient(torch.autograd.Function):
    """Identity on `out`; in backward, `aux` receives gradient 1, so minimising the training
    loss also minimises `aux` without `aux` appearing in the loss the trainer reports."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (aux,) = ctx.saved_tensors
        return grad, torch.ones_like(aux)


class MoE(nn.Module):
    """Routed experts, plus `shared_expert` (the model's MLP of `moe.shared_experts` ×
    `expert_hidden` units) when the config has one."""

    def __init__(self, cfg: ModelConfig, shared_expert: nn.Module | None) -> None:
        super().__init__()
        m = cfg.moe
        self.cfg = m
        self.gate = nn.Linear(cfg.dim, m.experts, bias=False)  # the router
        self.experts = Experts(m.experts, cfg.dim, cfg.expert_hidden)
        self.shared_expert = shared_expert
        self.shared_expert_gate = (
            nn.Linear(cfg.dim, 1, bias=False) if shared_expert and m.shared_expert_gate else None
        )
        # DeepSeek-V3 balancing: added to the scores for the choice of experts only
        self.register_buffer("balance_bias", torch.zeros(m.experts))
        # what the last forward pass did, for metrics and the bias update (not saved)
        self.register_buffer("tokens_per_expert", torch.zeros(m.experts), persistent=False)
        self.register_buffer("dropped", torch.zeros(()), persistent=False)
        self.register_buffer("balance_loss", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def reset_routing(self) -> None:
        """A new model's routing state (after `to_empty`; a checkpoint then restores the bias)."""
        for buffer in (self.balance_bias, self.tokens_per_expert, self.dropped, self.balance_loss):
            buffer.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        m = self.cfg
        scores = F.softmax(self.gate(x).float(), dim=-1)  # [tokens, experts]
        chosen = torch.topk(scores + self.balance_bias, m.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        if m.norm_top_k:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        out = self._dispatch(x, chosen, weights.to(x.dtype))
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        load = scores.new_zeros(m.experts).scatter_add_(  # (a bincount of static shape)
            0, chosen.flatten(), scores.new_ones(chosen.numel())
        )
        aux = m.experts * (load / chosen.numel() * scores.mean(dim=0)).sum()
        with torch.no_grad():
            self.tokens_per_expert.copy_(load)
            self.balance_loss.copy_(aux)
        if self.training and m.balance == "aux_loss" and m.aux_loss_weight > 0:
            out = _AddAuxLossGradient.apply(out, m.aux_loss_weight * aux)
        return out.reshape(shape)

    def _dispatch(
        self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Each token through its chosen experts, weighted and summed: [tokens, dim]."""
        tokens, k = chosen.shape
        experts = self.cfg.experts
        flat = chosen.flatten()
        order = torch.argsort(flat, stable=True)  # assignments grouped by expert
        counts = torch.zeros(experts, dtype=flat.dtype, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat))
        starts = torch.cumsum(counts, 0) - counts
        expert_of = flat[order]
        slot = torch.arange(flat.numel(), device=x.device) - starts[expert_of]
        if self.cfg.capacity_factor > 0 and self.training:  # inference is always dropless
            capacity = math.ceil(self.cfg.capacity_factor * tokens * k / experts)
        else:
            capacity = int(counts.max())  # dropless: every group as long as the longest
        # Shapes stay static (fake tensors can run this): an assignment over capacity is
        # written to an overflow row that is cut off, and its output is weighted by zero.
        kept = slot < capacity
        with torch.no_grad():
            self.dropped.copy_((~kept).sum())
        token = order // k
        groups = x.new_zeros(experts, capacity + 1, x.shape[-1])
        groups[expert_of, torch.where(kept, slot, capacity)] = x[token]
        done = self.experts(groups[:, :capacity])
        weight = weights.flatten()[order] * kept
        y = done[expert_of, slot.clamp(max=capacity - 1)] * weight[:, None]
        return x.new_zeros(x.shape).index_add_(0, token, y)


def moe_layers(parts: list[nn.Module]) -> list[MoE]:
    return [m for part in parts for m in part.modules() if isinstance(m, MoE)]


def _recomputing() -> bool:
    """Inside autograd's backward pass: a forward running now is activation recomputation."""
    return torch._C._current_graph_task_id() != -1


# torch.distributed.pipelining runs each stage once on its first schedule call to learn the
# shapes it sends (on real or empty tensors, depending on the torch version): not a micro-batch.
_SHAPE_PASSES = {"_shape_inference", "_forward_metadata_inference"}


def _inferring_shapes() -> bool:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name in _SHAPE_PASSES:
            return True
        frame = frame.f_back
    return False


class RoutingStats:
    """The routing of one optimizer step, summed over every training forward pass of its
    micro-batches (pipeline schedules run several per call; recomputed forwards are not
    counted), used by the bias balancing and logged to metrics.jsonl. Rows are the model's
    layer numbers, so pipeline stages, which hold different layers, sum the same table."""

    def __init__(self, parts: list[nn.Module], n_layers: int | None = None) -> None:
        self.layers, rows = [], []
        for part in parts:
            for name, module in part.named_modules():
                if isinstance(module, MoE):
                    self.layers.append(module)
                    number = name.split(".")[1] if name.startswith("layers.") else ""
                    rows.append(int(number) if number.isdigit() else len(rows))
        self.rows = rows
        self.table_rows = n_layers or len(rows)
        for row, layer in zip(rows, self.layers, strict=True):
            layer.register_forward_hook(lambda m, args, out, row=row: self._count(m, row, out))
        self.reset()

    def reset(self) -> None:
        first = self.layers[0].tokens_per_expert if self.layers else torch.zeros(0)
        self.table = first.new_zeros(self.table_rows, first.numel())  # on the layers' device
        self.dropped = first.new_zeros(())
        self.balance_loss = first.new_zeros(())
        self.forwards = 0

    @torch.compiler.disable  # bookkeeping outside a compiled block's graph
    def _count(self, layer: MoE, row: int, out: torch.Tensor) -> None:
        # (not: evaluation, recomputation, a pipeline stage's shape inference)
        if not layer.training or out.is_meta or _recomputing() or _inferring_shapes():
            return
        self.table[row] += layer.tokens_per_expert
        self.dropped += layer.dropped
        self.balance_loss += layer.balance_loss
        self.forwards += 1

    @property
    def load(self) -> torch.Tensor:
        """[this rank's MoE layers, experts]: tokens routed to each expert in this step."""
        return self.table[self.rows]

    @torch.no_grad()
    def update_balance_bias(self) -> None:
        """DeepSeek-V3's auxiliary-loss-free balancing, after an optimizer step: raise the bias
        of experts that received fewer tokens than the mean in this step, lower the others.
        The counts are summed over all ranks first (each stage fills its own layers' rows; tp
        ranks count the same tokens, which the sign does not see), so every replica keeps the
        same bias."""
        table = self.table.clone()
        if dist.is_initialized():
            dist.all_reduce(table)
        for row, layer in zip(self.rows, self.layers, strict=True):
            if layer.cfg.balance == "bias":
                counts = table[row]
                layer.balance_bias += layer.cfg.bias_update_rate * torch.sign(
                    counts.mean() - counts
                )

    def metrics(self) -> dict[str, float | list[float]]:
        """This rank's routing: each expert's share of the routed tokens (summed over layers),
        the busiest expert's load over the mean per layer (1.0 = balanced, averaged over
        layers), dropped assignments and the balance loss (mean over layers and micro-batches);
        under pipeline parallelism, this rank's stage's layers."""
        load = self.load.float()
        total = load.sum(dim=0)
        imbalance = load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)
        return {
            "moe_expert_load": [round(float(x), 5) for x in total / total.sum().clamp(min=1)],
            "moe_max_load": float(imbalance.mean()),
            "moe_dropped_tokens": float(self.dropped),
            "moe_balance_loss": float(self.balance_loss) / max(self.forwards, 1),
        }
