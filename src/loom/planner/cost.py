"""Step time: compute from the matrix shapes, communication per parallel dimension, the
pipeline bubble and offload traffic (Narayanan et al. 2021; Korthikanti et al. 2022).

Every matmul of a block is costed from its own shape: time = max(FLOPs / (peak · efficiency),
bytes / memory bandwidth), with an efficiency that falls for thin matrices. Elementwise work
(norms, activations, residuals, the loss) is memory-bound. Collectives are ring algorithms on
the link they run over; the data-parallel reduction overlaps the last micro-batch's backward.
The constants in `Calibration` are the only fitted numbers; `loom plan --calibrate` measures
them on this machine and BENCHMARKS.md says which were fitted on which published runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from loom.planner.memory import (
    BYTES,
    NF4_BYTES,
    lora_params,
    lora_params_per_layer,
    params_per_device,
    state_bytes,
)
from loom.planner.spec import Hardware, ModelShape, Strategy


@dataclass(frozen=True)
class Calibration:
    # Best achievable fraction of peak for large matmuls: the one constant fitted on a published
    # run (meg21_T1_145.6B, see loom.planner.published.fit_matmul_efficiency).
    matmul_efficiency: float = 0.76
    half_size: float = 64.0  # a matmul dimension of this size halves the efficiency
    elementwise_passes: float = 24.0  # forward reads+writes of [tokens, hidden] per block
    link_efficiency: float = 0.75  # achieved fraction of a link's bandwidth in collectives
    collective_latency_s: float = 10e-6  # per collective (launch, synchronisation)
    hop_latency_s: float = 1e-6  # per ring step
    dp_overlap: float = 1.0  # fraction of the last backward that hides gradient reduction
    step_overhead_s: float = 0.0  # fixed per optimizer step (logging, data, launch gaps)


DEFAULT_CALIBRATION = Calibration()


@dataclass(frozen=True)
class StepTime:
    compute: float  # forward, backward and recomputation on the busiest device
    bubble: float
    tensor_parallel: float
    data_parallel: float  # exposed part
    pipeline: float
    offload: float
    optimizer: float
    overhead: float
    model_flops: float  # per step, whole job, no recomputation (6N + attention)
    hardware_flops: float  # per step, whole job, with recomputation

    @property
    def total(self) -> float:
        return (
            self.compute
            + self.bubble
            + self.tensor_parallel
            + self.data_parallel
            + self.pipeline
            + self.offload
            + self.optimizer
            + self.overhead
        )

    def breakdown(self) -> dict[str, float]:
        keys = ("compute", "bubble", "tensor_parallel", "data_parallel", "pipeline", "offload")
        return {k: getattr(self, k) for k in (*keys, "optimizer", "overhead")}

    @property
    def bottleneck(self) -> str:
        parts = self.breakdown()
        parts["compute"] = 0.0
        worst = max(parts, key=lambda k: parts[k])
        if parts[worst] < 0.1 * self.total:
            return "compute"
        return worst


@dataclass
class _Cost:
    hw: Hardware
    cal: Calibration
    peak: float
    width: int
    gemm_time: dict[tuple[float, float, float], float] = field(default_factory=dict)

    def gemm(self, m: float, n: float, k: float) -> float:
        key = (m, n, k)
        if key not in self.gemm_time:
            c = self.cal
            shape = 1.0
            for dim in (m, n, k):
                shape *= dim / (dim + c.half_size)
            flops = 2 * m * n * k
            compute = flops / (self.peak * c.matmul_efficiency * shape)
            memory = (m * k + k * n + m * n) * self.width / (self.hw.hbm_gbps * 1e9)
            self.gemm_time[key] = max(compute, memory)
        return self.gemm_time[key]

    def collective(self, nbytes: float, ranks: int, factor: float, bandwidth: float) -> float:
        """Ring collective moving `factor · (ranks − 1)/ranks · nbytes` per device."""
        if ranks <= 1:
            return 0.0
        volume = factor * (ranks - 1) / ranks * nbytes
        steps = 2 * (ranks - 1) if factor >= 2 else ranks - 1
        link = bandwidth * 1e9 * self.cal.link_efficiency
        return volume / link + self.cal.collective_latency_s + steps * self.cal.hop_latency_s


def layer_forward_flops(model: ModelShape, tokens: float) -> float:
    """Matmul and attention FLOPs of one block's forward pass over `tokens` tokens."""
    attention = 4 * tokens * model.seq_len * model.q_dim  # QKᵀ and AV, full (not causal) square
    return 2 * tokens * model.matmul_params_per_layer() + attention


def model_flops_per_token(model: ModelShape, s: Strategy) -> float:
    """6·N_matmul + 12·L·H·Q·T: training FLOPs per token without recomputation (PaLM). LoRA /
    QLoRA: 4·N_matmul (the frozen weights get no gradients) + 6 per adapter parameter."""
    n = model.layers * model.matmul_params_per_layer() + model.vocab * model.hidden
    attention = 12 * model.layers * model.q_dim * model.seq_len
    if s.finetune == "full":
        return 6 * n + attention
    adapters = model.layers * lora_params_per_layer(model, s) * s.tp
    return 4 * n + attention + 6 * adapters


def step_time(
    model: ModelShape, hw: Hardware, s: Strategy, cal: Calibration = DEFAULT_CALIBRATION
) -> StepTime:
    width = BYTES[s.precision]
    peak = hw.peak_tflops[s.precision] * 1e12
    measured = {"matmul_efficiency": hw.matmul_efficiency, "half_size": hw.matmul_half_size}
    measured = {k: v for k, v in measured.items() if v is not None}
    if measured:
        cal = replace(cal, **measured)
    cost = _Cost(hw, cal, peak, width)
    t, b, seq = s.tp, s.micro_batch, model.seq_len / s.cp
    tokens = b * seq
    h, q, kv, f = model.hidden, model.q_dim, model.kv_dim, model.ffn_hidden
    mlp_in = 1 if model.arch == "gpt" else 2

    # One block, one micro-batch: forward matmuls (sharded by tp), attention, elementwise.
    forward_gemms = (
        cost.gemm(tokens, (q + 2 * kv) / t, h)
        + cost.gemm(tokens, h, q / t)
        + cost.gemm(tokens, mlp_in * f / t, h)
        + cost.gemm(tokens, h, f / t)
    )
    head_dim = q / model.heads
    heads = model.heads / t * b
    # QKᵀ and AV as batched matmuls per head (s × s × head_dim); flash attention skips half.
    attention = heads * 2 * cost.gemm(seq, seq, head_dim)
    if model.arch != "gpt":
        attention /= 2  # causal flash attention computes only the lower triangle
    if hw.attention_efficiency and s.precision in hw.attention_efficiency:
        # Measured: the attention kernel's rate relative to matmuls of the same FLOPs.
        attention = (
            heads
            * 2
            * 2
            * seq
            * seq
            * head_dim
            / 2
            / (peak * cal.matmul_efficiency * hw.attention_efficiency[s.precision])
        )
    elementwise = cal.elementwise_passes * tokens * h / (t if s.sp else 1)
    elementwise_time = elementwise * width / (hw.hbm_gbps * 1e9)
    if model.arch == "gpt":  # softmax, dropout and masking over the s × s scores
        elementwise_time += 6 * heads * seq * seq * width / (hw.hbm_gbps * 1e9)
    forward = forward_gemms + attention + elementwise_time
    # Backward: input gradients (one more pass of every matmul) and, for trained weights,
    # weight gradients (another). LoRA / QLoRA: the base is frozen, so only input gradients;
    # the rank-r adapters run forward and backward in full, at a rank-limited efficiency.
    frozen = s.finetune != "full"
    backward = (1 if frozen else 2) * forward_gemms + 2 * attention + 2 * elementwise_time
    if frozen:
        rank_shape = s.lora_rank / (s.lora_rank + cal.half_size)
        adapter = 2 * tokens * lora_params_per_layer(model, s) / (peak * cal.matmul_efficiency)
        forward += adapter / rank_shape
        backward += 2 * adapter / rank_shape
    if s.finetune == "qlora":
        # Every NF4 projection is dequantized (read 4-bit codes, write 16-bit) per pass.
        dequantize = model.matmul_params_per_layer() / t * (NF4_BYTES + width)
        forward += dequantize / (hw.hbm_gbps * 1e9)
        backward += dequantize / (hw.hbm_gbps * 1e9)
    recompute = {
        "none": 0.0,
        "full": forward,
        # GPT: the attention core again; Llama as Loom runs it: the cheap elementwise ops.
        "selective": attention + 0.5 * elementwise_time
        if model.arch == "gpt"
        else elementwise_time,
    }[s.recompute]
    layer = forward + backward + recompute

    # Tensor parallelism: 2 all-reduces (or all-gather + reduce-scatter) forward, 2 backward,
    # 2 more when the forward is recomputed.
    tp_link = hw.intra_node_gbps if t <= hw.devices_per_node else hw.inter_node_gbps
    activation = tokens * h * width
    per_collective = cost.collective(activation, t, 2, tp_link)
    tp_layer = (4 + (2 if s.recompute == "full" else 0)) * per_collective

    layers_per_stage = model.layers / s.pp
    logits = (2 if frozen else 3) * cost.gemm(tokens, model.vocab / t, h)
    loss = 6 * tokens * model.vocab / t * 4 / (hw.hbm_gbps * 1e9)
    head = logits + loss
    # The busiest stage is the last one: its layers plus the output projection and the loss.
    per_microbatch = layers_per_stage * (layer + tp_layer) + head
    m = s.microbatches
    compute = m * (layers_per_stage * layer + head)
    tensor_parallel = m * layers_per_stage * tp_layer

    bubble = 0.0
    pipeline = 0.0
    if s.pp > 1:
        v = s.virtual_stages if s.schedule == "Interleaved1F1B" else 1
        # 1F1B idles (pp − 1) micro-batch times, interleaving divides that by v. Zero-bubble
        # schedules move the weight gradients (about a third of a micro-batch's work) into it:
        # ZB-H1 (Qi et al. 2023) keeps (pp − 1)(F + B − W), a third, once every stage has as
        # many micro-batches as stages; with fewer only the last W overlaps: two thirds.
        fraction = (s.pp - 1) / v
        if s.schedule == "ZeroBubble":
            fraction = (s.pp - 1) / 3 if m >= s.pp else 2 * (s.pp - 1) / 3
        bubble = fraction * per_microbatch
        pp_link = (
            hw.inter_node_gbps if t * s.cp * s.pp > hw.devices_per_node else hw.intra_node_gbps
        )
        message = activation / t  # Megatron's scatter/gather: each tp rank sends its slice
        p2p = message / (pp_link * 1e9 * cal.link_efficiency) + cal.collective_latency_s
        pipeline = 2 * v * (m + s.pp - 1) * p2p

    # Data parallelism over the replicas' links: gradients reduced once per step, overlapping
    # the last micro-batch's backward; ZeRO-3 also gathers weights for every micro-batch. With
    # LoRA / QLoRA only the adapters' gradients are reduced, but every weight is gathered.
    psi = params_per_device(model, s)
    trainable = psi if s.finetune == "full" else lora_params(model, s)
    weight_bytes, grad_bytes, _ = state_bytes(s)
    dp_ranks = s.dp * s.cp
    spans_nodes = (
        t * dp_ranks * (s.pp if t * s.pp < hw.devices_per_node else 1) > hw.devices_per_node
    )
    dp_link = hw.inter_node_gbps if spans_nodes else hw.intra_node_gbps
    # ZeRO-3 reduce-scatters the gradients (its weights are gathered below); otherwise an
    # all-reduce, or ZeRO-1/2's reduce-scatter plus all-gather of the updated weights. HSDP
    # reduce-scatters within its shard group, then all-reduces the shard across the replicas.
    grads = trainable * min(grad_bytes, 4)
    if s.zero_stage >= 3:
        shard, replicas = s.shard_ranks * s.cp, s.dp // s.shard_ranks
        reduce = cost.collective(grads, shard, 1, dp_link)
        reduce += cost.collective(grads / shard, replicas, 2, dp_link)
    else:
        shard = dp_ranks
        reduce = cost.collective(grads, dp_ranks, 2, dp_link)
    gather = 0.0
    if s.zero_stage >= 3:
        gathered = psi * BYTES[s.precision if s.precision != "fp8" else "bf16"]
        gather = 2 * m * cost.collective(gathered, shard, 1, dp_link)
        gather = max(0.0, gather - cal.dp_overlap * compute)
    hidden = cal.dp_overlap * (backward * layers_per_stage)
    data_parallel = max(0.0, reduce - hidden) + gather

    offload = 0.0
    host_link = hw.host_link_gbps * 1e9
    if s.offload == "optimizer":
        offload = trainable * (grad_bytes + weight_bytes) / host_link + trainable * 16 / 2e9
    elif s.offload == "params":
        offload = trainable * (grad_bytes + weight_bytes) / host_link + trainable * 16 / 2e9
        offload += 2 * m * psi * 2 / host_link
    owned = trainable / (s.shard_ranks if s.zero_stage >= 1 else 1)
    optimizer = owned * 32 / (hw.hbm_gbps * 1e9) if s.offload == "none" else 0.0

    tokens_per_step = s.global_batch * model.seq_len
    model_flops = model_flops_per_token(model, s) * tokens_per_step
    recompute_flops = {
        "none": 0.0,
        "full": layer_forward_flops(model, 1.0),
        "selective": 4 * model.seq_len * q if model.arch == "gpt" else 0.0,
    }[s.recompute]
    hardware_flops = model_flops + recompute_flops * model.layers * tokens_per_step
    return StepTime(
        compute=compute,
        bubble=bubble,
        tensor_parallel=tensor_parallel,
        data_parallel=data_parallel,
        pipeline=pipeline,
        offload=offload,
        optimizer=optimizer,
        overhead=cal.step_overhead_s,
        model_flops=model_flops,
        hardware_flops=hardware_flops,
    )
