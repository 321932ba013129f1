"""Mixtral and Qwen2-MoE in Hugging Face folders: their `config.json` fields and per-expert tensors.

Released MoE checkpoints store each expert's projections as separate tensors
(`block_sparse_moe.experts.3.w1.weight` in Mixtral, `mlp.experts.3.gate_proj.weight` in
Qwen2-MoE); Loom, like transformers in memory, stacks them into `mlp.experts.gate_up_proj`
[experts, 2·hidden, dim] and `mlp.experts.down_proj` [experts, dim, hidden].
"""

from __future__ import annotations

import re
from typing import Any

import torch

from loom.core.errors import LoomError
from loom.core.model_config import ModelConfig, MoEConfig

MIXTRAL, QWEN2_MOE = "mixtral", "qwen2_moe"
ARCHITECTURES = {MIXTRAL: "MixtralForCausalLM", QWEN2_MOE: "Qwen2MoeForCausalLM"}
# the MoE block's name in each format, and its experts' gate, up and down projections
_BLOCK = {MIXTRAL: "block_sparse_moe", QWEN2_MOE: "mlp"}
_PROJECTIONS = {MIXTRAL: ("w1", "w3", "w2"), QWEN2_MOE: ("gate_proj", "up_proj", "down_proj")}
_EXPERT = re.compile(r"layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight")


def hf_moe_type(cfg: ModelConfig) -> str:
    """The transformers architecture that computes this mixture of experts exactly."""
    m = cfg.moe
    plain = not (cfg.qkv_bias or m.shared_experts or m.first_dense_layers)
    if m.every == 1 and plain and m.norm_top_k:
        return MIXTRAL
    if m.every == 1 and cfg.qkv_bias and m.shared_experts and m.shared_expert_gate:
        return QWEN2_MOE
    raise LoomError(
        f"model {cfg.preset!r}: no transformers architecture computes this mixture of experts; "
        "--format hf writes Mixtral (moe.every=1, no shared experts, moe.norm_top_k=true, no "
        "QKV bias) or Qwen2-MoE (QKV bias, gated shared experts, moe.every=1)"
    )


def hf_moe_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.json` fields of an MoE model, `model_type` and `architectures` included."""
    m, model_type = cfg.moe, hf_moe_type(cfg)
    fields: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [ARCHITECTURES[model_type]],
        "num_experts_per_tok": m.top_k,
        "router_aux_loss_coef": m.aux_loss_weight,
        "output_router_logits": False,
    }
    if model_type == MIXTRAL:
        fields |= {"num_local_experts": m.experts, "intermediate_size": cfg.expert_hidden}
        return fields | {"sliding_window": None}
    return fields | {
        "num_experts": m.experts,
        "moe_intermediate_size": cfg.expert_hidden,
        "shared_expert_intermediate_size": m.shared_experts * cfg.expert_hidden,
        "norm_topk_prob": m.norm_top_k,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(m.first_dense_layers)),
        "use_sliding_window": False,
        "qkv_bias": True,
    }


def moe_from_hf(raw: dict[str, Any], source: str) -> tuple[MoEConfig, int]:
    """The `[moe]` section and the dense MLP's hidden size of a Mixtral or Qwen2-MoE config."""
    model_type = raw["model_type"]
    top_k = int(raw.get("num_experts_per_tok", 2))
    aux = float(raw.get("router_aux_loss_coef", 0.001))
    if model_type == MIXTRAL:
        experts = int(raw["num_local_experts"])
        hidden = int(raw["intermediate_size"])
        return MoEConfig(experts=experts, top_k=top_k, aux_loss_weight=aux), hidden
    hidden, shared = int(raw["moe_intermediate_size"]), int(raw["shared_expert_intermediate_size"])
    dense_layers = list(raw.get("mlp_only_layers") or [])
    if int(raw.get("decoder_sparse_step", 1)) != 1 or dense_layers != list(
        range(len(dense_layers))
    ):
        raise LoomError(
            f"{source}: decoder_sparse_step={raw.get('decoder_sparse_step')} with "
            f"mlp_only_layers={dense_layers}: Loom's MoE layers follow the first dense ones "
            "without gaps (decoder_sparse_step=1, mlp_only_layers=[0, 1, ..])"
        )
    if not shared or shared % hidden:
        raise LoomError(
            f"{source}: shared_expert_intermediate_size={shared} is not a positive multiple of "
            f"moe_intermediate_size={hidden}; Loom's shared MLP is moe.shared_experts experts wide"
        )
    moe = MoEConfig(
        experts=int(raw["num_experts"]),
        top_k=top_k,
        shared_experts=shared // hidden,
        shared_expert_gate=True,
        expert_ffn_hidden=hidden,
        first_dense_layers=len(dense_layers),
        norm_top_k=bool(raw.get("norm_topk_prob", False)),
        aux_loss_weight=aux,
    )
    return moe, int(raw.get("intermediate_size", hidden))


def to_hf_moe(name: str, tensor: torch.Tensor, model_type: str) -> dict[str, torch.Tensor]:
    """One Loom tensor of an MoE block as HF tensors (unprefixed names); other names pass."""
    block = _BLOCK[model_type]
    layer, _, rest = name.partition(".mlp.")
    if rest not in ("balance_bias", "gate.weight", "experts.gate_up_proj", "experts.down_proj"):
        return {name: tensor}  # a dense MLP, the shared expert, attention, norms
    if rest == "balance_bias":
        if bool(tensor.any()):
            raise LoomError(
                f"{name} is not zero (moe.balance=bias moved it): {model_type} in transformers "
                "routes without it, so the exported model would choose other experts"
            )
        return {}
    if rest == "gate.weight":
        return {f"{layer}.{block}.gate.weight": tensor}
    gate, up, down = _PROJECTIONS[model_type]
    out = {}
    for e, weights in enumerate(tensor):
        prefix = f"{layer}.{block}.experts.{e}"
        if rest == "experts.gate_up_proj":
            halves = weights.chunk(2)
            out[f"{prefix}.{gate}.weight"], out[f"{prefix}.{up}.weight"] = halves
        else:
            out[f"{prefix}.{down}.weight"] = weights
    return {k: v.contiguous() for k, v in out.items()}


def loom_moe_name(name: str) -> str:
    """Mixtral's `block_sparse_moe.gate` is Loom's router `mlp.gate`."""
    return name.replace(".block_sparse_moe.gate.", ".mlp.gate.")


class ExpertStacker:
    """Collects per-expert tensors of an HF folder into Loom's stacked expert parameters."""

    def __init__(self, shapes: dict[str, torch.Size]) -> None:
        self.shapes = shapes
        self.stacks: dict[str, torch.Tensor] = {}
        self.filled: dict[str, set[tuple[int, int]]] = {}

    def add(self, name: str, tensor: torch.Tensor, source: str) -> bool:
        """Place `tensor` if `name` (unprefixed) is one expert's projection; False if not."""
        match = _EXPERT.fullmatch(name)
        if match is None:
            return False
        layer, expert, projection = match[1], int(match[3]), match[4]
        part = next((p.index(projection) for p in _PROJECTIONS.values() if projection in p), None)
        target = f"layers.{layer}.mlp.experts." + ("down_proj" if part == 2 else "gate_up_proj")
        if part is None or target not in self.shapes:
            raise LoomError(f"{source}: unexpected tensor {name} for this model")
        shape = self.shapes[target]
        if target not in self.stacks:
            self.stacks[target] = torch.empty(shape, dtype=tensor.dtype)
            self.filled[target] = set()
        rows = shape[1] // 2 if part < 2 else shape[1]
        if expert >= shape[0] or tuple(tensor.shape) != (rows, shape[2]):
            raise LoomError(
                f"{source}: {name} has shape {list(tensor.shape)}, but config.json implies "
                f"expert < {shape[0]} of shape {[rows, shape[2]]}"
            )
        start = rows if part == 1 else 0
        self.stacks[target][expert, start : start + rows] = tensor
        self.filled[target].add((expert, min(part, 1)))
        return True

    def complete(self) -> dict[str, torch.Tensor]:
        """The stacked parameters, each checked to have every expert's every projection."""
        for target, stack in self.stacks.items():
            expected = stack.shape[0] * (2 if target.endswith("gate_up_proj") else 1)
            if len(self.filled[target]) != expected:
                raise LoomError(
                    f"{target}: {expected - len(self.filled[target])} expert projection(s) "
                    "missing from the safetensors files"
                )
        return self.stacks
