"""Step time: compute from the matrix shapes, communication per parallel dimension, the
pipeline bubble and offload traffic (Narayanan et al. 2021; Korthikanti et al. 2022).

Every matmul of a block is costed from its own shape: time = max(FLOPs / (peak · efficiency),
bytes / memory bandwidth), with an efficiency that falls for thin matrices. Flash attention is
its own kernel with its own rate (causal: half the square); unfused attention (the 2021-22
Megatron runs) is batched matmuls plus softmax over the s × s scores. Elementwise work (norms,
rotary embeddings, activations, residuals, the loss) is memory-bound and counted in passes
over the block's [tokens, hidden] and [tokens, ffn] tensors; fused kernels (torch.compile,
Transformer Engine) make fewer passes. The CPU issues kernels one by one: a layer never runs
faster than its kernels can be launched.

Communication is costed per collective (ring algorithms on the link the group spans) and only
its exposed part is added: FSDP's per-layer all-gathers hide behind the previous layer's
compute, so they show when a device's share of the batch is small; context parallelism's K/V
all-gathers hide behind the attention kernel; data-parallel gradient reduction hides behind the
last micro-batch's backward. Pipelines split layers unevenly when they must (the busiest rank
sets the pace) and idle for the bubble of their schedule.

The constants in `Calibration` are the fitted numbers, each with its provenance (BENCHMARKS.md,
"Planner against published runs", lists the records each was fitted on and a ±50% sensitivity
row); `loom plan --calibrate` measures a machine instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from loom.planner.memory import (
    BYTES,
    NF4_BYTES,
    activation_bytes_per_layer,
    lora_params,
    lora_params_per_layer,
    offload_state_bytes,
    padded_share,
    params_per_device,
    rank_layers,
    state_bytes,
)
from loom.planner.spec import Hardware, ModelShape, Strategy


@dataclass(frozen=True)
class Calibration:
    """The model's constants. "Fitted" ones come from `loom.planner.validation.fit_calibration`
    on the fit third of reference/validation_runs.json (51 records; BENCHMARKS.md lists them,
    the held-out error and a ±50% sensitivity row per constant); the others are set from a
    paper, a datasheet or a count, as each comment says."""

    # Fraction of the datasheet peak large 16-bit matmuls reach (fitted), and the matrix
    # dimension at which a thin matmul's efficiency halves (fitted).
    matmul_efficiency: float = 0.72
    half_size: float = 44.0
    # fp8 matmuls: fraction of the fp8 peak large ones reach (fitted); the casts to fp8 read
    # each linear's 16-bit input, find its amax and write 8 bits: 3 passes (counted).
    fp8_efficiency: float = 0.70
    fp8_cast_passes: float = 3.0
    # Flash attention: forward rate as a fraction of the matmul ceiling (fitted). Its backward
    # (counted as twice the forward's FLOPs) takes this many times the forward's time per FLOP:
    # it runs 2.5x the forward's matmuls (QKᵀ again, dV, dP, dQ, dK) at 63% of peak against the
    # forward's 73% (FlashAttention-2, Dao 2023, on A100): 2.5 / 2 · 73 / 63 = 1.45.
    attention_efficiency: float = 0.50
    attention_backward: float = 1.45
    # Generic flash attention (FlashAttention-2, PyTorch SDPA) on GPUs whose full tensor rate
    # needs their generation's own instructions (Hopper's wgmma, Blackwell's tcgen05): the
    # fraction of the vendor-tuned kernel's rate (cuDNN / Transformer Engine) it reaches (fitted).
    generic_attention: float = 0.63
    # Bytes moved per block forward, in 16-bit passes over [tokens, hidden] (fitted: eager
    # PyTorch upcasts each RMSNorm to fp32, applies rotary embeddings op by op, adds residuals)
    # and over [tokens, ffn] (counted: SwiGLU reads gate and up, writes silu and the product:
    # 5); fused kernels (torch.compile, Transformer Engine) keep this fraction of it (fitted).
    elementwise_passes: float = 91.0
    ffn_elementwise_passes: float = 5.0
    fused_elementwise: float = 0.44
    # The CPU issues a block's forward as about 40 operators (counted in Loom's Llama block;
    # fused: a third of them), each taking this long on the CPU in eager PyTorch with FSDP's and
    # DTensor's hooks (fitted); a layer never runs faster than its operators are issued.
    kernels_per_layer: float = 40.0
    kernel_launch_s: float = 146e-6
    # Collectives: achieved fraction of a link's bandwidth and a fixed cost per collective
    # (set, NCCL's usual figures), and a cost per ring step (fitted: it tends to zero, as
    # NCCL pipelines its chunks).
    link_efficiency: float = 0.75
    collective_latency_s: float = 10e-6
    hop_latency_s: float = 1e-9
    dp_overlap: float = 1.0  # fraction of the last backward that hides gradient reduction (set)
    # Fraction of tensor-parallel traffic hidden behind matmuls (fitted).
    tp_overlap: float = 0.19
    # A part capped below its TDP runs its clocks at (cap / TDP) ** power_exponent (fitted).
    power_exponent: float = 0.56
    step_overhead_s: float = 0.0  # fixed per optimizer step (set: none)


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
    hardware_flops: float  # per step, whole job, as executed (causal attention, recomputation)
    context_parallel: float = 0.0  # exposed K/V traffic
    expert_parallel: float = 0.0  # the all-to-alls that take tokens to their experts and back

    @property
    def total(self) -> float:
        return sum(self.breakdown().values())

    def breakdown(self) -> dict[str, float]:
        keys = ("compute", "bubble", "tensor_parallel", "context_parallel", "expert_parallel")
        keys = (*keys, "data_parallel")
        return {
            k: getattr(self, k) for k in (*keys, "pipeline", "offload", "optimizer", "overhead")
        }

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
    peak: float  # matmul peak at the strategy's precision
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
            compute = flops / (self.peak * shape)
            memory = (m * k + k * n + m * n) * self.width / (self.hw.hbm_gbps * 1e9)
            self.gemm_time[key] = max(compute, memory)
        return self.gemm_time[key]

    def collective(self, nbytes: float, ranks: int, factor: float, stride: int) -> float:
        """Ring collective moving `factor · (ranks − 1)/ranks · nbytes` per device, over a group
        of `ranks` devices `stride` apart in the device order (tp innermost, then cp, dp, pp)."""
        if ranks <= 1:
            return 0.0
        volume = factor * (ranks - 1) / ranks * nbytes
        steps = 2 * (ranks - 1) if factor >= 2 else ranks - 1
        link = self.group_gbps(ranks, stride) * 1e9 * self.cal.link_efficiency
        return volume / link + self.cal.collective_latency_s + steps * self.cal.hop_latency_s

    def group_gbps(self, ranks: int, stride: int) -> float:
        """Bandwidth per device of a ring over the group. Within a node: NVLink. Across nodes,
        the ring's traffic is split over as many channels as the group has members per node,
        each on its own network card (NCCL runs one ring per NIC), so a group with k members
        in each node moves k times one card's rate across nodes, up to NVLink's."""
        hw = self.hw
        if ranks * stride <= hw.devices_per_node:
            return hw.intra_node_gbps
        per_node = max(1, min(ranks, hw.devices_per_node // max(1, stride)))
        return min(hw.intra_node_gbps, hw.inter_node_gbps * per_node)

    def memory_passes(self, nbytes: float) -> float:
        return nbytes / (self.hw.hbm_gbps * 1e9)


def layer_forward_flops(model: ModelShape, tokens: float) -> float:
    """Matmul and attention FLOPs of one block's forward pass over `tokens` tokens, attention
    counted over the full (not causal) square as PaLM's MFU convention does."""
    attention = 4 * tokens * model.seq_len * model.attention_width
    return 2 * tokens * model.matmul_params_per_layer() + attention


def model_flops_per_token(model: ModelShape, s: Strategy) -> float:
    """6·N_matmul + 12·L·H·Q·T: training FLOPs per token without recomputation (PaLM). LoRA /
    QLoRA: 4·N_matmul (the frozen weights get no gradients) + 6 per adapter parameter."""
    n = model.layers * model.matmul_params_per_layer() + model.vocab * model.hidden
    attention = 12 * model.layers * model.attention_width * model.seq_len
    if s.finetune == "full":
        return 6 * n + attention
    adapters = model.layers * lora_params_per_layer(model, s) * s.tp
    return 4 * n + attention + 6 * adapters


def _flash(model: ModelShape, s: Strategy) -> bool:
    """Flash (fused, causal) attention, as Loom and every current framework run it; the GPT
    records of 2021-22 ran unfused attention over the full square (flash_attention=false)."""
    return s.flash_attention


def _ring_recomputed(s: Strategy) -> bool:
    """Loom's selective recomputation recomputes ring attention (context parallelism) whole:
    its kernel is tiles of matmuls whose scores would otherwise all be kept."""
    return s.recompute == "selective" and s.cp > 1 and s.framework == "loom"


def executed_flops_per_token(model: ModelShape, s: Strategy) -> float:
    """FLOPs the hardware executes per token: causal flash attention computes half the square;
    recomputation repeats the forward (full) or the attention core (selective, unfused)."""
    flash = _flash(model, s)
    flops = model_flops_per_token(model, s)
    attention = 12 * model.layers * model.attention_width * model.seq_len
    if flash:
        flops -= attention / 2
    if s.recompute == "full":
        forward = layer_forward_flops(model, 1.0) - (
            2 * model.attention_width * model.seq_len if flash else 0
        )
        flops += model.layers * forward
    elif s.recompute == "selective" and not flash:
        flops += model.layers * 4 * model.seq_len * model.attention_width
    elif _ring_recomputed(s):
        flops += model.layers * 2 * model.seq_len * model.attention_width
    return flops


def step_time(
    model: ModelShape, hw: Hardware, s: Strategy, cal: Calibration = DEFAULT_CALIBRATION
) -> StepTime:
    width = BYTES[s.precision]
    measured = {"matmul_efficiency": hw.matmul_efficiency, "half_size": hw.matmul_half_size}
    measured = {k: v for k, v in measured.items() if v is not None}
    if measured:
        cal = replace(cal, **measured)
    half = BYTES["bf16"] if s.precision == "fp8" else width  # what is not fp8 runs in 16 bits
    clock = hw.clock
    if 0 < hw.power_limit_w < hw.tdp_w:
        clock *= (hw.power_limit_w / hw.tdp_w) ** cal.power_exponent
    hw = replace(hw, clock=clock)
    # Matmul rate: fp8 linears at their own ceiling, everything else at the 16-bit one.
    peak16 = hw.peak_tflops["bf16" if s.precision == "fp8" else s.precision] * 1e12
    linear_peak = peak16 * cal.matmul_efficiency * hw.clock
    if s.precision == "fp8":
        linear_peak = hw.peak_tflops["fp8"] * 1e12 * cal.fp8_efficiency * hw.clock
    cost = _Cost(hw, cal, linear_peak, width)
    attention_cost = _Cost(hw, cal, peak16 * cal.matmul_efficiency * hw.clock, half)
    t, b, cp = s.tp, s.micro_batch, s.cp
    seq = model.seq_len / cp  # this rank's share of each sequence
    tokens = b * seq
    # an MoE block's MLP as the width one token goes through (its top-k experts and shared MLP)
    h, q, kv, f = model.hidden, model.q_dim, model.kv_dim, model.active_ffn
    mlp_in = 1 if model.arch == "gpt" else 2
    fused = s.fused_kernels

    # One block, one micro-batch: forward matmuls (sharded by tp), attention, elementwise.
    # (latent attention's low-rank projections: as one matmul of their weights from h)
    projections = (
        cost.gemm(tokens, (q + 2 * kv) / t, h) + cost.gemm(tokens, h, q / t)
        if not model.attention_weights
        else cost.gemm(tokens, model.attention_weights / h / t, h)
    )
    # (loom train runs an MoE layer whole on every tp rank: its share of f is not split)
    whole = model.moe_active_ffn if s.framework == "loom" else 0.0
    mlp = (f - whole) / t + whole
    if model.moe_layers and (s.framework == "loom" or s.ep > 1):
        # the busiest expert (Loom pads every group to it) or ep rank sets the pace
        routed = model.moe_layers * model.top_k * model.expert_ffn / model.layers
        mlp += routed * (s.moe_imbalance - 1) / (1 if s.framework == "loom" else t)
    forward_gemms = projections + cost.gemm(tokens, mlp_in * mlp, h) + cost.gemm(tokens, h, mlp)
    head_dim = model.attention_width / model.heads
    heads = model.heads / t * b
    flash = _flash(model, s)
    if hw.attention_efficiency and half in (2, 4):
        # Measured (calibrated machines): the attention kernel's rate relative to matmuls.
        key = "fp32" if half == 4 else "bf16"
        rate = peak16 * cal.matmul_efficiency * hw.attention_efficiency.get(key, 1.0)
        attention = heads * 2 * 2 * seq * model.seq_len * head_dim / 2 / rate
        attention_backward = 2 * attention
    elif flash:
        # Causal flash attention: local queries against every key (context parallel), half.
        rate = peak16 * cal.matmul_efficiency * hw.clock * cal.attention_efficiency
        if hw.new_tensor_instructions and not s.vendor_kernels:
            rate *= cal.generic_attention
        attention = heads * 2 * 2 * seq * model.seq_len * head_dim / 2 / rate
        attention_backward = 2 * cal.attention_backward * attention
    else:  # QKᵀ and AV as batched matmuls over the full square, then softmax and masking
        # (counted: scale, mask, softmax each read and write the scores, 6 passes; Megatron's
        # fused scale-mask-softmax reads and writes them once, 2).
        attention = heads * 2 * attention_cost.gemm(seq, model.seq_len, head_dim)
        softmax = (2 if fused else 6) * heads * seq * model.seq_len * half
        attention += cost.memory_passes(softmax)
        attention_backward = 2 * attention
    passes = cal.elementwise_passes * h / (t if s.sp else 1) + cal.ffn_elementwise_passes * f / t
    elementwise = passes * tokens * half * (cal.fused_elementwise if fused else 1.0)
    if s.precision == "fp8":  # quantize each linear's input (and its gradient in backward)
        elementwise += cal.fp8_cast_passes * tokens * (2 * h + q + f) / t * half
    elementwise_time = cost.memory_passes(elementwise)
    forward = forward_gemms + attention + elementwise_time
    # Backward: input gradients (one more pass of every matmul) and, for trained weights,
    # weight gradients (another). LoRA / QLoRA: the base is frozen, so only input gradients;
    # the rank-r adapters run forward and backward in full, at a rank-limited efficiency.
    frozen = s.finetune != "full"
    backward = (1 if frozen else 2) * forward_gemms + attention_backward + 2 * elementwise_time
    if frozen:
        rank_shape = s.lora_rank / (s.lora_rank + cal.half_size)
        adapter = 2 * tokens * lora_params_per_layer(model, s) / cost.peak
        forward += adapter / rank_shape
        backward += 2 * adapter / rank_shape
    if s.finetune == "qlora":
        # Every NF4 projection is dequantized (read 4-bit codes, write 16-bit) per pass.
        dequantize = model.matmul_params_per_layer() / t * (NF4_BYTES + width)
        forward += cost.memory_passes(dequantize)
        backward += cost.memory_passes(dequantize)
    recompute = {
        "none": 0.0,
        "full": forward,
        # Unfused attention (and Loom's ring attention): the attention core again; flash
        # attention recomputes nothing more, Loom's Llama recomputes its cheap elementwise ops.
        "selective": (attention + 0.5 * elementwise_time)
        if not flash or _ring_recomputed(s)
        else elementwise_time,
    }[s.recompute]
    # A layer never runs faster than the CPU launches its kernels (eager: one per op).
    launches = cal.kernels_per_layer * (1 / 3 if fused else 1.0) * cal.kernel_launch_s
    forward_pass = max(forward, launches)
    backward_pass = max(backward + recompute, 2 * launches)
    layer = forward_pass + backward_pass

    # Tensor parallelism: 2 all-reduces (or all-gather + reduce-scatter) forward, 2 backward,
    # 2 more when the forward is recomputed; some frameworks overlap them with the matmuls.
    activation = tokens * h * half
    per_collective = cost.collective(activation, t, 2, 1)
    tp_layer = (4 + (2 if s.recompute == "full" else 0)) * per_collective * (1 - cal.tp_overlap)

    # Context parallelism (ring attention): each layer passes every rank's keys and values
    # round the cp ranks in cp − 1 hops (the volume and steps of a ring all-gather; again when
    # the forward is recomputed); backward passes them round again, with their fp32
    # gradients, which take one hop more to get home. Each hop overlaps a block of attention.
    cp_layer = 0.0
    if cp > 1:
        kv_bytes = b * model.seq_len * (kv + model.kv_value_dim) / t * half
        ring = cost.collective(kv_bytes, cp, 1, t)
        gradients = ring * 4 / half * cp / (cp - 1)
        passes_fwd = 2 if s.recompute == "full" else 1
        cp_layer = passes_fwd * max(0.0, ring - attention) + max(
            0.0, ring + gradients - attention_backward
        )

    # Expert parallelism: each MoE layer sends every token's hidden state to its top-k experts'
    # ranks and back (two all-to-alls forward, two in backward, two more when the forward is
    # recomputed); nothing overlaps them. Per layer on average over the model's layers.
    ep_layer = 0.0
    if s.ep > 1 and model.moe_layers:
        routed = tokens * model.top_k * h * half * s.moe_imbalance  # the busiest rank's
        exchanges = 4 + (2 if s.recompute == "full" else 0)
        # (ep within the dp ranks: cp·tp apart; over dp × cp, as loom train runs it: tp apart)
        all_to_all = cost.collective(routed, s.ep, 1, t * (s.cp if s.ep <= s.dp else 1))
        ep_layer = exchanges * all_to_all * model.moe_layers / model.layers

    # The busiest pipeline rank: its layers (uneven splits give some ranks one more) plus the
    # output projection and the loss on the last rank.
    loads = rank_layers(model.layers, s.pp, s.virtual_stages)
    logits = (2 if frozen else 3) * cost.gemm(tokens, model.vocab / t, h)
    loss = cost.memory_passes(6 * tokens * model.vocab / t * 4)
    head = logits + loss
    busiest = max(
        n * (layer + tp_layer + cp_layer + ep_layer) + (head if r == len(loads) - 1 else 0.0)
        for r, n in enumerate(loads)
    )
    worst_layers = max(loads)
    per_microbatch = busiest
    m = s.microbatches
    compute_per_mb = max(
        n * layer + (head if r == len(loads) - 1 else 0.0) for r, n in enumerate(loads)
    )
    compute = m * compute_per_mb
    tensor_parallel = m * worst_layers * tp_layer
    context_parallel = m * worst_layers * cp_layer
    expert_parallel = m * worst_layers * ep_layer

    bubble = 0.0
    pipeline = 0.0
    if s.pp > 1:
        v = s.virtual_stages if s.schedule == "Interleaved1F1B" else 1
        # 1F1B idles (pp − 1) micro-batch times, interleaving divides that by v (Narayanan et
        # al.) — once there are at least pp micro-batches. With m < pp a micro-batch still
        # visits all pp · v chunks one after another (pp micro-batch times in all) and the
        # others follow a chunk behind: (pp − m) + (m − 1) / v idle micro-batch times.
        # Zero-bubble schedules move the weight gradients (about a third of a micro-batch's
        # work) into it: ZB-H1 (Qi et al. 2023) keeps (pp − 1)(F + B − W), a third, once
        # every stage has as many micro-batches as stages; with fewer only the last W
        # overlaps: two thirds.
        fraction = max(m, s.pp) - m + (min(m, s.pp) - 1) / v
        if s.schedule == "ZeroBubble":
            fraction = (s.pp - 1) / 3 if m >= s.pp else 2 * (s.pp - 1) / 3
        bubble = fraction * per_microbatch
        # Stages are tp · cp · dp devices apart: neighbours in one node only for small groups.
        pp_link = (
            hw.inter_node_gbps if t * s.cp * s.dp >= hw.devices_per_node else hw.intra_node_gbps
        )
        message = activation / t  # Megatron's scatter/gather: each tp rank sends its slice
        p2p = message / (pp_link * 1e9 * cal.link_efficiency) + cal.collective_latency_s
        pipeline = 2 * v * (m + s.pp - 1) * p2p

    data_parallel = _data_parallel(
        model, hw, s, cost, cal, forward_pass, backward_pass, worst_layers
    )

    psi = params_per_device(model, s)
    trainable = psi if s.finetune == "full" else lora_params(model, s)
    owned = trainable / (s.state_shards if s.zero_stage >= 1 else 1)
    offload = offload_time(model, hw, s, owned, m)
    if s.activation_offload:
        # Each block's saved activations go to host memory in forward and come back in
        # backward, on a copy stream that overlaps the block's compute: only what a block's
        # compute cannot hide shows (max(compute, copy), not the sum).
        copy = activation_bytes_per_layer(model, s) / (hw.host_link_gbps * 1e9)
        hidden = max(0.0, copy - forward_pass) + max(0.0, copy - backward_pass)
        offload += m * worst_layers * hidden
    optimizer = cost.memory_passes(owned * 32) if s.offload == "none" else 0.0

    tokens_per_step = s.global_batch * model.seq_len
    return StepTime(
        compute=compute,
        bubble=bubble,
        tensor_parallel=tensor_parallel,
        context_parallel=context_parallel,
        expert_parallel=expert_parallel,
        data_parallel=data_parallel,
        pipeline=pipeline,
        offload=offload,
        optimizer=optimizer,
        overhead=cal.step_overhead_s,
        model_flops=model_flops_per_token(model, s) * tokens_per_step,
        hardware_flops=executed_flops_per_token(model, s) * tokens_per_step,
    )


def offload_time(model: ModelShape, hw: Hardware, s: Strategy, owned: float, m: int) -> float:
    """The optimizer step's offload traffic and host work per step, for the `owned` trained
    parameters whose step this device runs. It follows backward and precedes the next
    forward (nothing overlaps it but the NVMe tier's prefetch).

    offload=optimizer: gradients down and updated weights up the host link, AdamW on the
    node's CPUs (which every device of the node shares), and with offload_nvme the master and
    moments read and written back per step, prefetched while the CPUs step the previous chunk
    (max of the two). offload=params (FSDP's CPU offload): the sharded fp32 gradients down and
    weights up, the CPU step, and every micro-batch's forward and backward bring each weight
    shard to the device."""
    if s.offload == "none":
        return 0.0
    weight_bytes, grad_bytes, _ = state_bytes(s)
    # A CPU device is host memory: nothing crosses a link.
    host_link = float("inf") if hw.host_device else hw.host_link_gbps * 1e9
    sharing = min(hw.devices, hw.devices_per_node)  # devices whose step one node's CPUs run
    share = sharing / hw.devices_per_node  # ... with their share of its CPUs and drives
    cpu = owned * sharing / (hw.cpu_adam_params_per_s * share)
    if s.offload == "optimizer":
        if s.offload_nvme:
            state = offload_state_bytes(hw, s)
            io = 2 * owned * sharing * state / (hw.disk_gbps * 1e9 * share)
            cpu = max(cpu, io)
        return owned * (grad_bytes + weight_bytes) / host_link + cpu
    shard = params_per_device(model, s) / (s.state_shards if s.zero_stage >= 3 else 1)
    return owned * (grad_bytes + weight_bytes) / host_link + cpu + 2 * m * shard * 4 / host_link


def _data_parallel(
    model: ModelShape,
    hw: Hardware,
    s: Strategy,
    cost: _Cost,
    cal: Calibration,
    forward_pass: float,
    backward_pass: float,
    layers: int,
) -> float:
    """Exposed data-parallel time per step. Gradients are reduced once per step, overlapping
    the last micro-batch's backward; ZeRO-3 / FSDP also all-gathers each layer's weights before
    its forward and again before its backward, prefetched while the layer before computes, so
    only what a layer's compute cannot hide shows. With LoRA / QLoRA only the adapters'
    gradients are reduced, but every weight is gathered."""
    psi = params_per_device(model, s) * padded_share(model, s)  # FSDP moves padded shards
    experts = 0.0
    if s.ep > 1:  # split experts are neither gathered nor reduced across all the dp ranks
        split = 1 if s.framework == "loom" else s.tp  # loom train: whole on each tp rank
        experts = model.expert_params_per_layer() / split * layers
        psi -= experts
    trainable = psi if s.finetune == "full" else lora_params(model, s)
    _, grad_bytes, _ = state_bytes(s)
    dp_ranks = s.dp * s.cp
    stride = s.tp  # data-parallel ranks (with the context-parallel ones) are tp apart
    # ZeRO-3 reduce-scatters the gradients; otherwise an all-reduce, or ZeRO-1/2's
    # reduce-scatter plus all-gather of the updated weights. HSDP reduce-scatters within its
    # shard group, then all-reduces the shard across the replicas.
    grads = trainable * min(grad_bytes, 4)
    if s.zero_stage >= 3:
        shard, replicas = s.state_shards, s.dp // s.shard_ranks
        reduce = cost.collective(grads, shard, 1, stride)
        reduce += cost.collective(grads / shard, replicas, 2, stride * shard)
    else:
        shard = dp_ranks
        reduce = cost.collective(grads, dp_ranks, 2, stride)
    if experts and s.finetune == "full":  # each expert's copies: dp / ep of them
        copies = dp_ranks // s.ep
        reduce += cost.collective(experts / s.ep * min(grad_bytes, 4), copies, 2, stride)
    exposed = max(0.0, reduce - cal.dp_overlap * backward_pass * layers)
    if s.zero_stage >= 3:
        gathered = psi * BYTES[s.precision if s.precision != "fp8" else "bf16"]
        per_layer = cost.collective(gathered / max(1, layers), shard, 1, stride)
        per_microbatch = layers * (
            max(0.0, per_layer - cal.dp_overlap * forward_pass)
            + max(0.0, per_layer - cal.dp_overlap * backward_pass)
        )
        # The first layer's gather has nothing before it to hide behind.
        exposed += s.microbatches * per_microbatch + per_layer
    return exposed
