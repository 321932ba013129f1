"""What the planner is asked: model shape, hardware, an optional strategy and training length.

The JSON schema is that of the records in shared/reference/published_runs.json (`model`,
`hardware`, `strategy`, `training`); published.py picks a record's fields into it. Every field
is checked here, before any estimate: an unknown key is refused (a typo would otherwise be
silently ignored), and errors name the field and the fix.
"""

from __future__ import annotations

import functools
import math
import tempfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from loom.core.config import config_from_dict
from loom.core.errors import LoomError, read_json
from loom.core.model_config import ModelConfig
from loom.core.presets import PRESETS, get_preset


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int
    seq_len: int
    arch: str = "llama"  # "llama" (SwiGLU, RMSNorm, no biases) or "gpt" (GeLU 4h MLP, biases)
    tied: bool = False
    head_dim: int = 0
    # a mixture of experts (Llama blocks): `moe_layers` of the layers route each token to
    # `top_k` of `experts` SwiGLU experts of width `expert_ffn`, beside a shared MLP of width
    # `shared_ffn`; the other layers keep the dense `ffn_hidden` MLP
    experts: int = 0
    top_k: int = 0
    expert_ffn: int = 0
    shared_ffn: int = 0
    moe_layers: int = 0
    # latent attention (DeepSeek's MLA): the weights of one block's attention projections
    # (low-rank query and key/value, instead of q/k/v/o of heads × head_dim) and the value
    # heads' width (narrower than the query/key heads' head_dim); 0 = standard attention
    attention_weights: int = 0
    value_head_dim: int = 0
    attention_unsplit: int = 0  # of them, what tp leaves whole (down-projections, their norms)

    def _mlp_width(self, experts: int) -> float:
        """MLP width per layer, averaged over the layers, with `experts` experts per MoE layer."""
        dense = self.layers - self.moe_layers
        moe = experts * self.expert_ffn + self.shared_ffn
        return (dense * self.ffn_hidden + self.moe_layers * moe) / self.layers

    @property
    def active_ffn(self) -> float:
        """The MLP width one token goes through, per layer on average (dense: ffn_hidden)."""
        return self._mlp_width(self.top_k) if self.moe_layers else self.ffn_hidden

    def expert_params_per_layer(self) -> float:
        """The routed experts' weights per layer (averaged over the layers)."""
        return self.moe_layers * 3 * self.hidden * self.expert_ffn * self.experts / self.layers

    def moe_params_per_layer(self) -> float:
        """An MoE layer's weights (routed and shared experts, router), averaged over the
        layers."""
        shared = self.moe_layers * 3 * self.hidden * self.shared_ffn / self.layers
        return self.expert_params_per_layer() + shared + self._router_params()

    @property
    def moe_active_ffn(self) -> float:
        """The part of `active_ffn` in MoE layers (top-k experts and the shared MLP)."""
        return self.moe_layers * (self.top_k * self.expert_ffn + self.shared_ffn) / self.layers

    def _router_params(self) -> float:
        return self.moe_layers * self.hidden * self.experts / self.layers

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    @property
    def v_dim(self) -> int:
        """The width of the values all query heads read (the query width unless MLA)."""
        return self.heads * self.value_head_dim if self.value_head_dim else self.q_dim

    @property
    def kv_value_dim(self) -> int:
        """The width of one token's values (the keys' width unless MLA)."""
        return self.kv_heads * self.value_head_dim if self.value_head_dim else self.kv_dim

    @property
    def attention_width(self) -> float:
        """Per token and key, attention's two matmuls (scores and values) take 2 · this many
        multiply-adds: the query width for standard attention."""
        return (self.q_dim + self.v_dim) / 2

    def attention_matmul_params(self) -> float:
        """The weights of one block's attention projections."""
        h = self.hidden
        return self.attention_weights or h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h

    def layer_params(self) -> float:
        """Parameters of one block (an MoE model's: the average over its blocks)."""
        h = self.hidden
        attn = self.attention_matmul_params()
        if self.arch == "gpt":  # 2 MLP matrices, biases, LayerNorm weight + bias
            return (
                attn
                + 2 * h * self.ffn_hidden
                + (self.q_dim + 2 * self.kv_dim + h)
                + (self.ffn_hidden + h)
                + 4 * h
            )
        if self.moe_layers:
            return attn + 3 * h * self._mlp_width(self.experts) + self._router_params() + 2 * h
        return attn + 3 * h * self.ffn_hidden + 2 * h

    def embedding_params(self) -> int:
        """Input embedding (+ learned positions for GPT)."""
        return self.vocab * self.hidden + (self.seq_len * self.hidden if self.arch == "gpt" else 0)

    def head_params(self) -> int:
        """Final norm and, unless tied, the output projection."""
        norm = 2 * self.hidden if self.arch == "gpt" else self.hidden
        return norm + (0 if self.tied or self.arch == "gpt" else self.vocab * self.hidden)

    def params(self) -> int:
        return round(
            self.layers * self.layer_params() + self.embedding_params() + self.head_params()
        )

    def replicated_params_per_layer(self) -> int:
        """Norm weights (and GPT's LayerNorm biases; latent attention's down-projections):
        copied, not split, by tensor parallelism."""
        return (4 * self.hidden if self.arch == "gpt" else 2 * self.hidden) + self.attention_unsplit

    def matmul_params_per_layer(self) -> float:
        """The weights one token multiplies by in a block (an MoE block: its top-k experts,
        the shared MLP and the router)."""
        h = self.hidden
        mlp = (2 if self.arch == "gpt" else 3) * h * self.active_ffn + self._router_params()
        return self.attention_matmul_params() + mlp


# AdamW parameters updated per second by one node's CPUs, for the offload tiers' optimizer
# step: DeepSpeed's CPU-Adam, about 1 s per billion parameters on a DGX-2's two 24-core Xeons
# (ZeRO-Offload, Ren et al. 2021, Table 3); an assumed figure for the GPU nodes of the table.
# torch's fused CPU AdamW (what Loom's offload runs), measured here: 2.0e9 parameters/s on 2
# threads of an AMD EPYC (torch 2.13, fp32, 64M parameters) -- memory-bound, so a node's many
# cores reach at least the DeepSpeed figure.
CPU_ADAM_PARAMS_PER_S = 1.0e9
CPU_ADAM_MEASURED_HERE = 2.0e9  # params/s, torch fused AdamW, 2 threads, this machine


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: dict[str, float]  # per precision
    memory_gb: float  # per device, GB = 1e9 bytes
    devices: int
    devices_per_node: int = 8
    intra_node_gbps: float = 300.0  # GB/s per device, one direction (NVLink)
    inter_node_gbps: float = 25.0  # GB/s per device (e.g. 200 Gb/s HDR IB per GPU)
    hbm_gbps: float = 2000.0  # device memory bandwidth, GB/s
    # The offload tiers, per node (a job on part of a node gets its devices' share of them).
    host_memory_gb: float = 1000.0
    host_link_gbps: float = 25.0  # device <-> host, GB/s per device (PCIe)
    disk_gb: float = 0.0  # local NVMe for memory.offload_dir; 0 = none
    disk_gbps: float = 0.0  # NVMe read (and write) bandwidth, all drives together
    cpu_adam_params_per_s: float = CPU_ADAM_PARAMS_PER_S  # the host CPUs' AdamW step rate
    matmul_efficiency: float | None = None  # measured ceiling (calibration); None = default
    matmul_half_size: float | None = None  # measured (calibration); None = default
    attention_efficiency: dict[str, float] | None = None  # of the matmul rate, per precision
    clock: float = 1.0  # sustained fraction of the datasheet peak
    power_limit_w: float = 0.0  # a power cap below the part's TDP lowers its clocks; 0 = none
    tdp_w: float = 0.0
    new_tensor_instructions: bool = False  # Hopper / Blackwell: generic kernels fall short
    # Memory a process takes before any tensor: the CUDA context, NCCL and allocator workspaces
    # on a GPU; on a CPU, Python with torch and Loom loaded (measured).
    runtime_gb: float = 1.0
    # The device is the host CPU: one RAM, nothing crosses a host link, and fp32 parameters
    # are their own master weights when the optimizer is offloaded.
    host_device: bool = False


@dataclass(frozen=True)
class Strategy:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    cp: int = 1
    sp: bool = False
    zero_stage: int = 0  # 0 none, 1 optimizer, 2 + gradients, 3 + parameters (FSDP)
    recompute: str = "none"  # none | selective | full
    micro_batch: int = 1
    global_batch: int = 1  # sequences per optimizer step
    virtual_stages: int = 1  # interleaved pipeline chunks per rank
    schedule: str = "1F1B"  # GPipe | 1F1B | Interleaved1F1B | ZeroBubble
    offload: str = "none"  # none | optimizer | params
    offload_nvme: bool = False  # offload=optimizer with its state in files (memory.offload_dir)
    activation_offload: bool = False  # saved activations wait in host memory until backward
    precision: str = "bf16"  # compute precision: bf16 | fp8 | fp32
    # loom: what loom train runs (fp32 params, grads and Adam, eager kernels); pytorch: another
    # PyTorch FSDP trainer (torchtitan, llm-foundry) with the same states and kernels and
    # layouts Loom does not run yet (context parallelism); megatron: 16-bit params/grads + 12 B
    # of fp32 master and Adam, NVIDIA's fused kernels.
    framework: str = "loom"
    finetune: str = "full"  # full | lora | qlora
    lora_rank: int = 16
    dp_shard: int = 0  # ZeRO shards over this many of the dp ranks (HSDP: fewer); 0 = all
    compile: bool = False  # torch.compile fuses the elementwise kernels
    flash_attention: bool = True  # false: unfused attention over the full square (2021-22 GPT)
    ep: int = 1  # expert parallelism over the dp ranks (loom train: ep = dp × cp, ZeRO-3)
    # routed tokens of the busiest expert over the mean (1.0 = balanced; loom train logs it as
    # moe_max_load): the busiest ep rank sets the pace, and Loom pads every expert's group to
    # the longest, so routed-expert compute (and under ep, the all-to-all) scales with it
    moe_imbalance: float = 1.0

    @property
    def fused_kernels(self) -> bool:
        """Fused elementwise kernels: torch.compile, or Megatron's (Transformer Engine)."""
        return self.compile or self.vendor_kernels

    @property
    def vendor_kernels(self) -> bool:
        """Megatron-style frameworks run NVIDIA's own attention and fused kernels."""
        return self.framework == "megatron"

    @property
    def devices(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def shard_ranks(self) -> int:
        """The data-parallel ranks ZeRO / FSDP shards over; HSDP replicates these groups."""
        return self.dp_shard or self.dp

    @property
    def state_shards(self) -> int:
        """The ranks ZeRO / FSDP splits model states over: the sharding data-parallel ranks
        with their context-parallel ones (each holds other tokens of the same sequences)."""
        return self.shard_ranks * self.cp

    @property
    def microbatches(self) -> int:
        """Micro-batches per optimizer step on each data-parallel replica."""
        return self.global_batch // (self.dp * self.micro_batch)


@dataclass(frozen=True)
class PlanSpec:
    model: ModelShape
    hardware: Hardware
    strategy: Strategy | None = None
    training_tokens: float | None = None
    base: Strategy = field(default_factory=Strategy)  # fixed choices when searching
    fixed: frozenset[str] = frozenset()  # strategy fields the search must not vary
    unbuilt: bool = False  # plan offload tiers `loom train` does not run yet


def unsplit_moe_params(model: ModelShape, s: Strategy) -> float:
    """An MoE layer's weights per block that tensor parallelism leaves whole: all of them under
    `loom train` (each tp rank runs the MoE on the block's tokens), none where experts are
    split by tensor parallelism too (Megatron)."""
    return model.moe_params_per_layer() if s.framework == "loom" else 0.0


# -- hardware table ----------------------------------------------------------------------------

# name: (peak TFLOP/s by precision, memory GB, NVLink GB/s per direction, HBM GB/s)
GPU_TABLE: dict[str, tuple[dict[str, float], float, float, float]] = {
    "a100": ({"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}, 80, 300, 2039),
    "a100-40gb": ({"bf16": 312.0, "fp16": 312.0, "fp32": 156.0}, 40, 300, 1555),
    "h100": ({"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 494.7}, 80, 450, 3350),
    # H800: the H100 SXM's compute and memory with NVLink cut to 400 GB/s (both directions)
    "h800": ({"bf16": 989.4, "fp16": 989.4, "fp8": 1978.9, "fp32": 494.7}, 80, 200, 3350),
    "h100-pcie": ({"bf16": 756.0, "fp16": 756.0, "fp8": 1513.0, "fp32": 378.0}, 80, 300, 2000),
    "h200": ({"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 494.5}, 141, 450, 4800),
    "b200": ({"bf16": 2250.0, "fp16": 2250.0, "fp8": 4500.0, "fp32": 1100.0}, 180, 900, 8000),
    "gb200": ({"bf16": 2500.0, "fp16": 2500.0, "fp8": 5000.0, "fp32": 1250.0}, 186, 900, 8000),
    "gb300": ({"bf16": 2500.0, "fp16": 2500.0, "fp8": 5000.0, "fp32": 1250.0}, 288, 900, 8000),
    "mi300x": ({"bf16": 1307.4, "fp16": 1307.4, "fp8": 2614.9, "fp32": 653.7}, 192, 448, 5300),
    "v100": ({"fp16": 125.0, "bf16": 125.0, "fp32": 15.7}, 32, 150, 900),
    "rtx4090": ({"bf16": 165.2, "fp16": 165.2, "fp8": 330.3, "fp32": 82.6}, 24, 32, 1008),
    "l40s": ({"bf16": 362.0, "fp16": 362.0, "fp8": 733.0, "fp32": 183.0}, 48, 32, 864),
}


# The node around the GPUs, for the offload tiers (assumptions, per node of devices_per_node):
# host memory GB, NVMe GB and NVMe GB/s (about 3 GB/s per data-center drive).
# DGX A100 320 GB: 1 TB, 4 x 3.84 TB; DGX A100 640 GB, DGX H100 / H200: 2 TB, 8 x 3.84 TB;
# DGX B200: 4 TB, 8 x 3.84 TB; MI300X platforms: 2 TB, 8 x 3.84 TB; DGX-1 V100: 512 GB,
# 4 x 1.92 TB; GB200 NVL72: 480 GB of LPDDR5X per Grace (two GPUs), 72 x 3.84 TB;
# a 4-GPU RTX 4090 / L40S workstation: 512 GB, one 4 TB PCIe 4.0 drive at 7 GB/s.
NODE_TABLE: dict[str, tuple[float, float, float]] = {
    "a100": (2000, 30720, 24),
    "a100-40gb": (1000, 15360, 12),
    "h100": (2000, 30720, 24),
    "h100-pcie": (2000, 30720, 24),
    "h800": (2000, 30720, 24),
    "h200": (2000, 30720, 24),
    "b200": (4000, 30720, 24),
    "gb200": (36 * 480, 72 * 3840, 72 * 3),
    "gb300": (36 * 480, 72 * 3840, 72 * 3),
    "mi300x": (2000, 30720, 24),
    "v100": (512, 7680, 8),
    "rtx4090": (512, 4000, 7),
    "l40s": (512, 4000, 7),
}


# Board power the datasheet peaks are quoted at (W), for parts run under a lower power cap.
TDP_W = {
    "a100": 400.0,
    "a100-40gb": 400.0,
    "h100": 700.0,
    "h800": 700.0,
    "h200": 700.0,
    "b200": 1000.0,
}


def gpu_hardware(name: str, devices: int, **overrides: Any) -> Hardware:
    key = _gpu_key(name)
    if key is None:
        raise LoomError(
            f"hardware.gpu={name!r} is not in the table ({', '.join(GPU_TABLE)}); give "
            "hardware.peak_tflops and hardware.gpu_mem_gb instead"
        )
    peak, memory, nvlink, hbm = GPU_TABLE[key]
    values: dict[str, Any] = {
        "name": key,
        "peak_tflops": peak,
        "memory_gb": memory,
        "devices": devices,
        "intra_node_gbps": nvlink,
        "hbm_gbps": hbm,
    }
    if key in ("rtx4090", "l40s"):  # PCIe cards: no NVLink, slower network
        values.update(devices_per_node=4, inter_node_gbps=12.5)
    if key in ("h100", "h800", "h200", "b200"):
        values.update(inter_node_gbps=50.0, host_link_gbps=50.0)  # 400 Gb/s per GPU
    if key in ("gb200", "gb300"):  # NVL72: one NVLink domain of 72 GPUs
        values.update(devices_per_node=72, inter_node_gbps=50.0, host_link_gbps=50.0)
    host, disk, disk_gbps = NODE_TABLE[key]
    values.update(host_memory_gb=host, disk_gb=disk, disk_gbps=disk_gbps)
    values["tdp_w"] = TDP_W.get(key, 0.0)
    values["new_tensor_instructions"] = key.startswith(("h100", "h800", "h200", "b200", "gb"))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Hardware(**values)


def _gpu_key(name: str) -> str | None:
    lowered = name.lower().replace("_", "-").replace(" ", "-").removeprefix("nvidia-")
    if lowered in GPU_TABLE:
        return lowered
    for key in sorted(GPU_TABLE, key=len, reverse=True):  # "a100-sxm4-80gb" -> a100
        stem = key.split("-")[0]
        if lowered.startswith(stem) and ("40gb" in lowered) == ("40gb" in key):
            if ("pcie" in lowered) != ("pcie" in key):  # "h100-sxm-80gb" is not the PCIe card
                continue
            return key
    return None


# -- parsing -----------------------------------------------------------------------------------

# The keys each section of a spec knows: one table per section, from the dataclasses where the
# names are the same.
RENAMED = {"pipeline_schedule": "schedule"}  # strategy key (published records) -> field
MODEL_KEYS = ("preset", *(f.name for f in fields(ModelShape)))
HARDWARE_FIELDS = {  # spec key -> Hardware field, for the per-device numbers a spec overrides
    "gpu_mem_gb": "memory_gb",
    "intra_node_gbps": "intra_node_gbps",
    "inter_node_gbps": "inter_node_gbps",
    "host_mem_gb": "host_memory_gb",
    "host_link_gbps": "host_link_gbps",
    "hbm_gbps": "hbm_gbps",
    "power_limit_w": "power_limit_w",  # a cap below the part's TDP (clocks fall)
    "disk_gb": "disk_gb",  # per node, for the NVMe tier
    "disk_gbps": "disk_gbps",
    "cpu_adam_params_per_s": "cpu_adam_params_per_s",  # per node
}
HARDWARE_KEYS = ("gpu", "n_gpus", "peak_tflops", "gpus_per_node", *HARDWARE_FIELDS)
STRATEGY_KEYS = (*(f.name for f in fields(Strategy)), *RENAMED)
# The fields the search keeps as given (search.candidates); it chooses the others itself.
SEARCH_KEYS = (
    "cp",
    "micro_batch",
    "recompute",
    "zero_stage",
    "global_batch",
    "precision",
    "framework",
    "finetune",
    "lora_rank",
    "moe_imbalance",
)
TRAINING_KEYS = ("tokens", "seq_len", "global_batch_tokens")
SPEC_KEYS = ("model", "hardware", "strategy", "search", "training", "unbuilt")


def check_keys(raw: dict[str, Any], where: str, known: tuple[str, ...]) -> None:
    """Refuse a key this part of the spec does not know (a typo would be silently ignored)."""
    for key in raw:
        if key not in known:
            raise LoomError(f"{where}.{key} is not a known key; known: {', '.join(known)}")


def model_from_config(cfg: ModelConfig, seq_len: int) -> ModelShape:
    moe = cfg.moe
    return ModelShape(
        layers=cfg.n_layers,
        hidden=cfg.dim,
        heads=cfg.n_heads,
        kv_heads=cfg.n_kv_heads,
        ffn_hidden=cfg.ffn_hidden,
        vocab=cfg.vocab_size,
        seq_len=seq_len,
        arch="llama",
        tied=cfg.tie_embeddings,
        head_dim=cfg.head_dim,
        experts=moe.experts,
        top_k=moe.top_k if moe.enabled else 0,
        expert_ffn=cfg.expert_hidden if moe.enabled else 0,
        shared_ffn=moe.shared_experts * cfg.expert_hidden if moe.enabled else 0,
        moe_layers=cfg.moe_layers,
        attention_weights=cfg.attention_params() if cfg.latent_attention else 0,
        value_head_dim=cfg.v_head_dim if cfg.latent_attention else 0,
        attention_unsplit=_latent_down_projections(cfg),
    )


def _latent_down_projections(cfg: ModelConfig) -> int:
    """Latent attention's weights that tensor parallelism leaves whole: the query and key/value
    down-projections and their norms (loom.parallel.tensor splits the rest by heads)."""
    if not cfg.latent_attention:
        return 0
    q, kv = cfg.q_lora_rank, cfg.kv_lora_rank
    return (cfg.dim * q + q if q else 0) + cfg.dim * (kv + cfg.rope_head_dim) + kv


# A whole shape's keys that default to 0: a mixture of experts, latent attention.
OPTIONAL_SHAPE_KEYS = (
    "experts",
    "top_k",
    "expert_ffn",
    "shared_ffn",
    "moe_layers",
    "attention_weights",
    "value_head_dim",
    "attention_unsplit",
)


def parse_model(raw: Any, seq_len: int | None = None) -> ModelShape:
    """A preset name, {preset, seq_len?} or the whole shape; `seq_len` (training.seq_len) is
    the sequence length when the model does not give one (a different one is refused)."""
    if isinstance(raw, str):
        if raw not in PRESETS:
            raise LoomError(f"model {raw!r} is not a preset; use one of {', '.join(PRESETS)}")
        cfg = get_preset(raw)
        return model_from_config(cfg, seq_len or min(cfg.max_seq_len, 8192))
    if not isinstance(raw, dict):
        raise LoomError("spec.model must be a preset name or an object with layers, hidden, ...")
    check_keys(raw, "spec.model", MODEL_KEYS)
    if raw.get("seq_len") is not None:
        given = _int(raw, "seq_len", "model")
        if seq_len is not None and given != seq_len:
            raise LoomError(
                f"spec.model.seq_len={given} and spec.training.seq_len={seq_len} disagree; "
                "give the sequence length once"
            )
        seq_len = given
    if "preset" in raw:
        shape_keys = sorted(set(raw) - {"preset", "seq_len"})
        if shape_keys:
            raise LoomError(
                f"spec.model.{shape_keys[0]} is not used with spec.model.preset; give a preset "
                "(and seq_len), or the whole shape without a preset"
            )
        return parse_model(raw["preset"], seq_len)
    raw = {**raw, "seq_len": seq_len}
    required = ("layers", "hidden", "heads", "seq_len")
    missing = [k for k in required if raw.get(k) in (None, "")]
    if missing:
        raise LoomError(
            f"spec.model lacks {', '.join(missing)}; give them or a preset name "
            f"({', '.join(PRESETS)})"
        )
    arch = str(raw.get("arch") or "llama")
    arch = "gpt" if "gpt" in arch.lower() else "llama"
    hidden = _int(raw, "hidden", "model")
    heads = _int(raw, "heads", "model")
    shape = ModelShape(
        layers=_int(raw, "layers", "model"),
        hidden=hidden,
        heads=heads,
        kv_heads=int(raw.get("kv_heads") or heads),
        ffn_hidden=int(raw.get("ffn_hidden") or (4 * hidden if arch == "gpt" else 0)),
        vocab=int(raw.get("vocab") or 51200),
        seq_len=_int(raw, "seq_len", "model"),
        arch=arch,
        tied=bool(raw.get("tied", arch == "gpt")),
        head_dim=_int(raw, "head_dim", "model") if raw.get("head_dim") is not None else 0,
        **{k: _int(raw, k, "model") for k in OPTIONAL_SHAPE_KEYS if raw.get(k) is not None},
    )
    complete = 0 < shape.top_k <= shape.experts and shape.expert_ffn > 0 and shape.moe_layers > 0
    if (shape.experts and not complete) or shape.moe_layers > shape.layers:
        raise LoomError(
            f"spec.model: experts={shape.experts} makes a mixture of experts: give top_k (1 to "
            f"experts), expert_ffn (each expert's width) and moe_layers (1 to layers="
            f"{shape.layers}; shared_ffn for shared experts)"
        )
    if shape.ffn_hidden <= 0:
        raise LoomError("spec.model.ffn_hidden is needed for a Llama-style model")
    if shape.heads % shape.kv_heads or (not shape.head_dim and shape.hidden % shape.heads):
        raise LoomError(
            f"spec.model: kv_heads={shape.kv_heads} must divide heads={shape.heads} and heads "
            f"must divide hidden={shape.hidden} (or give head_dim)"
        )
    return shape


def parse_hardware(raw: Any) -> Hardware:
    if not isinstance(raw, dict):
        raise LoomError("spec.hardware must be an object with gpu (or peak_tflops) and n_gpus")
    check_keys(raw, "spec.hardware", HARDWARE_KEYS)
    devices = _int(raw, "n_gpus", "hardware")
    overrides: dict[str, Any] = {
        field_name: _opt_float(raw, key) for key, field_name in HARDWARE_FIELDS.items()
    }
    if raw.get("gpus_per_node") is not None:
        overrides["devices_per_node"] = _int(raw, "gpus_per_node", "hardware")
    peak = raw.get("peak_tflops")
    if raw.get("gpu") == "this":
        # Lazy: calibrate imports torch, and `loom plan` for a named GPU must not load it.
        from loom.planner.calibrate import this_machine

        return this_machine(devices)
    if raw.get("gpu"):
        hardware = gpu_hardware(str(raw["gpu"]), devices, **overrides)
        if isinstance(peak, int | float):  # an explicit peak wins over the table
            hardware = replace(hardware, peak_tflops={**hardware.peak_tflops, "bf16": peak})
        return hardware
    if peak is None or overrides["memory_gb"] is None:
        raise LoomError(
            "spec.hardware needs gpu (one of " + ", ".join(GPU_TABLE) + ") or both "
            "peak_tflops and gpu_mem_gb"
        )
    peaks = peak if isinstance(peak, dict) else {"bf16": float(peak), "fp16": float(peak)}
    return Hardware(
        name="custom",
        peak_tflops={k: float(v) for k, v in peaks.items()},
        devices=devices,
        **{k: v for k, v in overrides.items() if v is not None},  # type: ignore[arg-type]
    )


RECOMPUTE_WORDS = {"none": "none", "selective": "selective", "full": "full"}


def parse_strategy(raw: Any, devices: int, defaults: Strategy | None = None) -> Strategy:
    if not isinstance(raw, dict):
        raise LoomError("spec.strategy must be an object (tp, pp, dp, micro_batch, ...)")
    check_keys(raw, "spec.strategy", STRATEGY_KEYS)
    base = defaults or Strategy()
    values: dict[str, Any] = {}
    whole = ("tp", "pp", "cp", "ep", "micro_batch", "global_batch", "virtual_stages", "lora_rank")
    for key in (*whole, "dp_shard"):
        if raw.get(key) is not None:
            values[key] = _int(raw, key, "strategy")
    if raw.get("moe_imbalance") is not None:
        imbalance = _opt_float(raw, "moe_imbalance")
        if imbalance is None or imbalance < 1:
            raise LoomError(
                f"spec.strategy.moe_imbalance={raw['moe_imbalance']!r} is the busiest expert's "
                "tokens over the mean: 1.0 (balanced) or more"
            )
        values["moe_imbalance"] = imbalance
    if raw.get("zero_stage") is not None:
        values["zero_stage"] = _int(raw, "zero_stage", "strategy")
    for key in ("sp", "compile", "flash_attention", "offload_nvme", "activation_offload"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], bool):
                raise LoomError(f"spec.strategy.{key} must be true or false, got {raw[key]!r}")
            values[key] = raw[key]
    if raw.get("recompute") is not None:
        values["recompute"] = _recompute_word(str(raw["recompute"]))
    for key in ("schedule", "offload", "precision", "framework", "finetune"):
        if raw.get(key) is not None:
            values[key] = str(raw[key])
    if raw.get("pipeline_schedule"):
        values["schedule"] = _schedule_word(str(raw["pipeline_schedule"]))
    elif values.get("virtual_stages", 1) > 1 and "schedule" not in values:
        values["schedule"] = "Interleaved1F1B"
    strategy = replace(base, **values)
    if isinstance(raw.get("offload"), bool):
        strategy = replace(strategy, offload="optimizer" if raw["offload"] else "none")
    dp = raw.get("dp")
    others = strategy.tp * strategy.pp * strategy.cp
    if dp is None:
        if devices % others:
            raise LoomError(
                f"strategy: tp × pp × cp = {others} does not divide {devices} devices; change "
                "tp, pp or cp, or hardware.n_gpus"
            )
        dp = devices // others
    strategy = replace(strategy, dp=int(dp))
    if strategy.devices != devices:
        raise LoomError(
            f"strategy: tp × pp × dp × cp = {strategy.tp} × {strategy.pp} × {strategy.dp} × "
            f"{strategy.cp} = {strategy.devices}, but hardware.n_gpus = {devices}; make them equal"
        )
    if raw.get("global_batch") is None:
        strategy = replace(strategy, global_batch=strategy.dp * strategy.micro_batch)
    return strategy


def check_strategy(model: ModelShape, hw: Hardware, s: Strategy, unbuilt: bool = False) -> None:
    """Refuse a strategy that cannot be realised, saying what to change (`unbuilt`: offload
    tiers `loom train` does not run yet are planned, not refused)."""
    for name in ("tp", "pp", "dp", "cp", "micro_batch", "global_batch", "virtual_stages"):
        if getattr(s, name) < 1:
            raise LoomError(f"strategy.{name}={getattr(s, name)} must be at least 1")
    if model.heads % s.tp or (model.kv_heads % s.tp and s.tp % model.kv_heads):
        raise LoomError(
            f"strategy.tp={s.tp} must divide the {model.heads} attention heads (and the "
            f"{model.kv_heads} KV heads, or be a multiple of them)"
        )
    if model.layers < s.pp * s.virtual_stages:
        raise LoomError(
            f"strategy: pp × virtual_stages = {s.pp * s.virtual_stages} stages for "
            f"{model.layers} layers leaves a stage empty; use at most {model.layers} stages"
        )
    if s.cp > 1 and model.seq_len % (2 * s.cp):
        raise LoomError(
            f"strategy.cp={s.cp}: context parallelism splits each sequence into 2 × cp chunks "
            f"(balanced causal attention); seq_len={model.seq_len} must be a multiple of "
            f"{2 * s.cp}"
        )
    if s.global_batch % (s.dp * s.micro_batch):
        raise LoomError(
            f"strategy.global_batch={s.global_batch} is not a multiple of dp × micro_batch = "
            f"{s.dp * s.micro_batch}"
        )
    if s.zero_stage not in (0, 1, 2, 3):
        raise LoomError(f"strategy.zero_stage={s.zero_stage} must be 0, 1, 2 or 3")
    if s.recompute not in ("none", "selective", "full"):
        raise LoomError(f"strategy.recompute={s.recompute!r} must be none, selective or full")
    if s.offload not in ("none", "optimizer", "params"):
        raise LoomError(f"strategy.offload={s.offload!r} must be none, optimizer or params")
    if s.offload_nvme and s.offload != "optimizer":
        raise LoomError(
            "strategy.offload_nvme moves the optimizer state from host memory to disk; it "
            "needs offload=optimizer"
        )
    if s.offload_nvme and hw.disk_gb <= 0:
        raise LoomError(
            f"strategy.offload_nvme: the hardware ({hw.name}) has no disk; give "
            "hardware.disk_gb and hardware.disk_gbps"
        )
    if s.offload == "optimizer" and s.framework == "pytorch":
        raise LoomError(
            "strategy.offload=optimizer with framework=pytorch: PyTorch FSDP offloads all "
            "states together; use offload=params, or framework=megatron to plan a Megatron / "
            "DeepSpeed run"
        )
    if s.ep > 1 and (not model.moe_layers or model.experts % s.ep or (s.dp * s.cp) % s.ep):
        raise LoomError(
            f"strategy.ep={s.ep} splits a mixture of experts: the model needs experts, and ep "
            f"must divide them ({model.experts}) and strategy.dp × cp = {s.dp * s.cp}"
        )
    fsdp_ranks = s.dp * s.cp
    if s.framework == "loom" and s.ep > 1 and (s.ep != fsdp_ranks or s.zero_stage != 3):
        raise LoomError(
            f"strategy.ep={s.ep}: loom train splits the experts over all its FSDP ranks "
            f"(ep = dp × cp = {fsdp_ranks}, zero_stage=3)"
        )
    refusal = loom_refusal(s, unbuilt)
    if refusal:
        raise LoomError(
            f"strategy: {refusal}; or framework=megatron to plan a Megatron / DeepSpeed run, "
            "or spec.unbuilt=true (--unbuilt) to plan the tier before loom train runs it"
        )
    if s.cp > 1 and s.framework == "loom" and s.zero_stage != 3:
        raise LoomError(
            f"strategy.cp={s.cp}: loom train shards the model over the dp and cp ranks (FSDP, "
            "zero_stage=3); or framework=pytorch (torchtitan-style) or megatron to plan a run "
            "of another trainer"
        )
    if s.dp_shard and s.dp % s.dp_shard:
        raise LoomError(
            f"strategy.dp_shard={s.dp_shard} must divide dp={s.dp} (HSDP shards within groups "
            "of dp_shard ranks); or give 0 to shard over all of dp"
        )
    if s.precision not in hw.peak_tflops:
        raise LoomError(
            f"strategy.precision={s.precision!r}: the hardware has peaks for "
            f"{', '.join(hw.peak_tflops)}"
        )
    if s.framework not in FRAMEWORKS:
        raise LoomError(
            f"strategy.framework={s.framework!r} must be one of {', '.join(FRAMEWORKS)}"
        )
    if s.finetune not in ("full", "lora", "qlora"):
        raise LoomError(f"strategy.finetune={s.finetune!r} must be full, lora or qlora")
    if s.schedule not in ("GPipe", "1F1B", "Interleaved1F1B", "ZeroBubble"):
        raise LoomError(
            f"strategy.schedule={s.schedule!r} must be GPipe, 1F1B, Interleaved1F1B or ZeroBubble"
        )
    if s.tp > hw.devices_per_node:
        raise LoomError(
            f"strategy.tp={s.tp} spans more than one node ({hw.devices_per_node} devices); "
            "keep tp within a node"
        )
    refusal = finetune_refusal(s)
    if refusal:
        raise LoomError(f"strategy: {refusal}")


FRAMEWORKS = ("loom", "pytorch", "megatron")


def loom_refusal(s: Strategy, unbuilt: bool = False) -> str | None:
    """Why `loom train` would refuse this layout's offload tiers, or None: the planner offers
    Loom only what Loom runs. The memory section is asked of the config's own validation
    (loom.core.config), so a tier is offered from the moment `loom train` accepts it;
    `unbuilt` (spec.unbuilt, `loom plan --unbuilt`) plans the tiers it refuses as well."""
    if s.framework != "loom":
        return None
    refusal = memory_refusal(s.offload, s.activation_offload, s.offload_nvme)
    if refusal and not unbuilt:
        return f"loom train does not run this offload tier yet: {refusal}"
    if s.offload == "params" and s.tp > 1:
        return "loom train runs offload=params (FSDP's CPU offload) with tp=1 only; set tp=1"
    return None


@functools.cache
def memory_refusal(offload: str, activation_offload: bool, nvme: bool) -> str | None:
    """The config's refusal of these memory.* values, or None when `loom train` runs them."""
    memory = {"offload": offload, "activation_offload": activation_offload}
    if nvme:
        memory["offload_dir"] = tempfile.gettempdir()  # a writable folder: only the tier matters
    try:
        config_from_dict({"memory": memory})
    except LoomError as e:
        return str(e)
    return None


def finetune_refusal(s: Strategy) -> str | None:
    """Why `loom finetune` would refuse this LoRA / QLoRA layout, or None: the planner offers
    only layouts Loom runs (Megatron-style frameworks also run adapters tensor parallel)."""
    if s.framework != "loom" or s.finetune == "full":
        return None
    if s.finetune == "qlora" and s.devices > 1:
        return (
            "loom finetune runs QLoRA in one process (NF4 weights are not sharded yet); plan "
            "it on one device (--gpus 1 / hardware.n_gpus=1) or use finetune=lora"
        )
    if s.finetune == "qlora" and s.offload == "params":
        return (
            "loom finetune keeps QLoRA's NF4 base on the device (FSDP's offload to host memory "
            "does not take NF4 weights); set offload=none or use finetune=lora"
        )
    if s.tp > 1 or s.pp > 1 or s.cp > 1:
        return (
            f"loom finetune trains {s.finetune.upper()} adapters data parallel only (FSDP "
            "shards the frozen base); set tp=1, pp=1 and cp=1"
        )
    return None


def _recompute_word(text: str) -> str:
    lowered = text.lower()
    for word in ("selective", "full", "none"):
        if lowered.startswith(word) or f"{word} " in lowered:
            return word
    raise LoomError(f"strategy.recompute={text!r} must be none, selective or full")


def _schedule_word(text: str) -> str:
    lowered = text.lower()
    if "interleaved" in lowered:
        return "Interleaved1F1B"
    if "gpipe" in lowered:
        return "GPipe"
    if "zero" in lowered and "bubble" in lowered:
        return "ZeroBubble"
    return "1F1B"


def _int(raw: dict[str, Any], key: str, section: str) -> int:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise LoomError(f"spec.{section}.{key} must be a whole number, got {value!r}")
    if value < 0:
        raise LoomError(f"spec.{section}.{key}={value} must not be negative")
    return int(value)


def _opt_float(raw: dict[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise LoomError(f"spec.hardware.{key} must be a positive number, got {value!r}")
    return float(value)


def parse_spec(raw: Any) -> PlanSpec:
    if not isinstance(raw, dict):
        raise LoomError("the spec must be a JSON object with model and hardware")
    check_keys(raw, "spec", SPEC_KEYS)
    for key in ("model", "hardware"):
        if key not in raw:
            raise LoomError(f"the spec lacks {key!r}; see `loom plan --help`")
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise LoomError("spec.training must be an object (tokens, seq_len, global_batch_tokens)")
    check_keys(training, "spec.training", TRAINING_KEYS)
    seq_len = _int(training, "seq_len", "training") if "seq_len" in training else None
    if seq_len == 0:
        raise LoomError("spec.training.seq_len must be at least 1")
    tokens = _positive(training, "tokens")
    batch_tokens = _positive(training, "global_batch_tokens")
    model = parse_model(raw["model"], seq_len)
    hardware = parse_hardware(raw["hardware"])
    strategy_raw = raw.get("strategy") or None
    search = raw.get("search") or {}
    if not isinstance(search, dict):
        raise LoomError('spec.search must be an object (e.g. {"finetune": "lora"})')
    check_keys(search, "spec.search", SEARCH_KEYS)
    if strategy_raw and search:
        raise LoomError(
            "the spec gives both strategy (a fixed layout) and search (fields of a search); "
            "give one"
        )
    if batch_tokens is not None:
        batch = batch_sequences(batch_tokens / model.seq_len)
        section = "strategy" if strategy_raw else "search"
        given = (strategy_raw if isinstance(strategy_raw, dict) else search).get("global_batch")
        if given is not None and given != batch:
            raise LoomError(
                f"spec.{section}.global_batch={given} and spec.training.global_batch_tokens="
                f"{batch_tokens:g} ({batch} sequences of {model.seq_len}) disagree; give one"
            )
        if strategy_raw and isinstance(strategy_raw, dict):
            strategy_raw = {**strategy_raw, "global_batch": batch}
        else:
            search = {**search, "global_batch": batch}
    unbuilt = raw.get("unbuilt", False)
    if not isinstance(unbuilt, bool):
        raise LoomError(f"spec.unbuilt must be true or false, got {unbuilt!r}")
    strategy = None
    if strategy_raw:
        strategy = parse_strategy(strategy_raw, hardware.devices)
        check_strategy(model, hardware, strategy, unbuilt)
    base = strategy or Strategy()
    fixed: frozenset[str] = frozenset()
    if not strategy and search:
        cp = _int(search, "cp", "search") if "cp" in search else 1
        base = parse_strategy({**search, "dp": 1, "tp": 1, "pp": 1}, cp)
        fixed = frozenset(search)
    return PlanSpec(model, hardware, strategy, tokens, base, fixed, unbuilt)


def batch_sequences(sequences: float) -> int:
    """Round a batch given in tokens to sequences that split over many data-parallel degrees:
    a multiple of 256 (16e6 tokens of 8192 -> 2048 sequences), or a power of two below."""
    if sequences >= 256:
        return 256 * max(1, round(sequences / 256))
    return 2 ** max(0, round(math.log2(max(sequences, 1))))


def _positive(raw: dict[str, Any], key: str) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise LoomError(f"spec.training.{key} must be a positive number, got {value!r}")
    return float(value)


def load_spec(path: str | Path) -> PlanSpec:
    return parse_spec(read_json(Path(path), "spec file"))
