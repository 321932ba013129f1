"""Memory per device: model states (ZeRO / FSDP, precision, LoRA / QLoRA), activations
(Korthikanti et al. 2022, adapted to Llama blocks), and an allowance for everything else.

All figures are bytes on the most loaded device: the first pipeline stage, which holds the
embedding and the most micro-batches in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from loom.planner.collectives import fsdp_padding, pipeline_microbatches
from loom.planner.spec import Hardware, ModelShape, Strategy, unsplit_moe_params

GB = 1e9
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
NF4_BYTES = 0.5 + 4 / 64 / 4 + 4 / 64 / 256  # 4-bit weights, double-quantised absmax per 64
LORA_TARGETS = 7  # q, k, v, o, gate, up, down in every block
CONTEXT_BYTES = 1.0 * GB  # a GPU's runtime_gb (Hardware): CUDA context, NCCL, workspaces
FRAGMENTATION = 0.05  # of the tensors above, lost to the caching allocator


@dataclass(frozen=True)
class Memory:
    params: float
    grads: float
    optimizer: float
    activations: float
    other: float
    host: float = 0.0  # bytes per device kept in host memory (offload)
    disk: float = 0.0  # bytes per device kept in files on the node's NVMe (offload_nvme)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.other

    def gib(self) -> dict[str, float]:
        fields = ("params", "grads", "optimizer", "activations", "other", "total")
        return {k: getattr(self, k) / 2**30 for k in fields}


def state_bytes(s: Strategy) -> tuple[float, float, float]:
    """Bytes per parameter of weights, gradients and optimizer state, before sharding.

    `loom` keeps fp32 weights (the master copy), fp32 gradients and Adam's two fp32 moments and
    computes in bf16 by casting (FSDP) or autocast: 4 + 4 + 8. `megatron` (and the ZeRO paper)
    keeps 16-bit weights and gradients and a separate fp32 master copy with the moments:
    2 + 2 + 12. Both are 16 bytes; which part is sharded by which ZeRO stage differs.
    """
    if s.precision == "fp32":
        return 4.0, 4.0, 8.0
    if s.framework == "megatron":
        return 2.0, 2.0, 12.0
    return 4.0, 4.0, 8.0


def model_state_bytes(
    params: float, s: Strategy, experts: float = 0.0
) -> tuple[float, float, float]:
    """Weights, gradients and optimizer bytes per device for `params` parameters on that
    device (already divided by tensor and pipeline parallelism), sharded by the ZeRO stage. Of
    them, `experts` are routed experts' weights: expert parallelism splits them over its ep
    ranks and ZeRO shards each expert over the ranks that hold a copy of it (dp·cp / ep)."""
    weight, grad, optim = state_bytes(s)

    def sharded(n: float, shards: float) -> tuple[float, float, float]:
        return (
            n * weight / (shards if s.zero_stage >= 3 else 1),
            n * grad / (shards if s.zero_stage >= 2 else 1),
            n * optim / (shards if s.zero_stage >= 1 else 1),
        )

    dense = sharded(params - experts, s.state_shards)
    split = sharded(experts / s.ep, s.state_shards / s.ep)
    return dense[0] + split[0], dense[1] + split[1], dense[2] + split[2]


def padded_share(model: ModelShape, s: Strategy) -> float:
    """FSDP2's padding (collectives.fsdp_padding) over this rank's blocks and root group."""
    padded_block, padded_outer = fsdp_padding(model, s)
    if padded_block == padded_outer == 1.0:
        return 1.0
    blocks = max(rank_layers(model.layers, s.pp, s.virtual_stages)) * model.layer_params()
    outer = outer_params_per_device(model, s) * s.tp
    return (blocks * padded_block + outer * padded_outer) / (blocks + outer)


def lora_params_per_layer(model: ModelShape, s: Strategy) -> float:
    """Trainable LoRA parameters of one block on one device: r · (d_in + d_out) for every
    targeted linear, split by tensor parallelism."""
    h, f = model.hidden, model.ffn_hidden
    per_layer = s.lora_rank * (
        (h + model.q_dim) + 2 * (h + model.kv_dim) + (model.q_dim + h) + 2 * (h + f) + (f + h)
    )
    return per_layer / s.tp


def lora_params(model: ModelShape, s: Strategy) -> float:
    """Trainable LoRA parameters per device: those of its share of the blocks."""
    return max(rank_layers(model.layers, s.pp, s.virtual_stages)) * lora_params_per_layer(model, s)


def adapter_state_bytes(model: ModelShape, psi: float, s: Strategy) -> tuple[float, float, float]:
    """LoRA / QLoRA: weights, gradients and optimizer bytes per device, where `psi` is the base
    parameters on that device (already divided by tensor and pipeline parallelism).

    The frozen base is 16-bit, except that Loom keeps it in fp32; QLoRA stores the blocks'
    projections (the adapted linears) as NF4 and leaves the embedding, head and norms as they
    are. Loom applies FSDP2 (`fully_shard`) to the whole model after adding the adapters, and
    FSDP shards every parameter of a block, trainable or frozen: under ZeRO stage 3 each device
    keeps 1/dp of the base, as in full training. Only the adapters have gradients and Adam
    state, sharded by the ZeRO stage like any trained weight.
    """
    dense_bytes = 4.0 if s.framework == "loom" else 2.0
    base = psi * dense_bytes
    if s.finetune == "qlora":
        layers = max(rank_layers(model.layers, s.pp, s.virtual_stages))
        projections = layers * model.matmul_params_per_layer() / s.tp
        base -= projections * (dense_bytes - NF4_BYTES)
    base /= s.state_shards if s.zero_stage >= 3 else 1
    weights, grads, optim = model_state_bytes(lora_params(model, s), s)
    return base + weights, grads, optim


def rank_layers(layers: int, pp: int, virtual_stages: int = 1) -> list[int]:
    """Layers each pipeline rank holds as `loom train` splits them
    (loom.parallel.pipeline.stage_layer_ranges): pp · v stages, stage i starting at layer
    ⌊L·i / (pp·v)⌋, and rank r holding stages r, r + pp, ... When pp · v does not divide L
    (Llama 3 405B: 126 layers on 16 stages) some stages hold one layer more."""
    stages = pp * virtual_stages
    bounds = [layers * i // stages for i in range(stages + 1)]
    sizes = [bounds[i + 1] - bounds[i] for i in range(stages)]
    return [sum(sizes[r::pp]) for r in range(pp)]


def params_per_device(model: ModelShape, s: Strategy) -> float:
    """Parameters on the most loaded device: its share of the layers plus the embedding (first
    stage) or the head (last stage); tensor parallelism splits all but the norms."""
    replicated = model.replicated_params_per_layer() + unsplit_moe_params(model, s)
    per_layer = (model.layer_params() - replicated) / s.tp + replicated
    return max(rank_layers(model.layers, s.pp, s.virtual_stages)) * per_layer + (
        outer_params_per_device(model, s)
    )


def outer_params_per_device(model: ModelShape, s: Strategy) -> float:
    """The parameters outside the blocks on the most loaded device: embedding and head (with
    the final norm) on one stage, the larger of the two under pipeline parallelism."""
    norm = 2 * model.hidden if model.arch == "gpt" else model.hidden
    embedding = model.embedding_params() / s.tp
    head = (model.head_params() - norm) / s.tp + norm
    return embedding + head if s.pp == 1 else max(embedding, head)


def activation_bytes_per_layer(model: ModelShape, s: Strategy) -> float:
    """Bytes one block keeps for backward for one micro-batch.

    GPT blocks use Korthikanti et al.'s counts exactly (16-bit activations, dropout masks, the
    s × s attention scores); Llama blocks as Loom runs them (no dropout, flash attention that
    keeps only a log-sum-exp per head and position, SwiGLU, RMSNorm) use the same kind of
    count of the tensors autograd saves, measured in benchmarks/activation_memory.py.
    """
    s_len = model.seq_len / s.cp
    sbh = s_len * s.micro_batch * model.hidden
    t, a, h = s.tp, model.heads, model.hidden
    if model.arch == "gpt":
        scores = 5 * a * s_len / h
        if s.recompute == "full":
            return 2 * sbh / (t if s.sp else 1)
        if s.recompute == "selective":
            return 34 * sbh / t if s.sp else sbh * (10 + 24 / t)
        if s.sp:
            return sbh * (34 / t + scores / t)
        return sbh * (10 + 24 / t + scores / t)
    lse = 4 * a * s_len * s.micro_batch / t  # fp32 log-sum-exp per head and position
    replicated, units = _llama_units(model, s.recompute)
    reference = _llama_units(LLAMA_REFERENCE, s.recompute)[1]
    saved = LLAMA_FP32_BYTES[s.recompute] / 4 * units / reference  # [tokens, hidden] tensors
    if s.precision == "fp32":
        per_sbh = 4 * saved
    else:  # under autocast the residual stream, the norms and the block input stay fp32
        fp32 = LLAMA_FP32_UNDER_FSDP if _fsdp_casts(s) else LLAMA_FP32_UNDER_AUTOCAST
        fixed = fp32[s.recompute]
        per_sbh = 4 * fixed + 2 * (saved - fixed)
    share = replicated / units
    split = share * (1 / t if s.sp else 1.0) + (1 - share) / t
    kept = per_sbh * sbh * split + (lse if s.recompute != "full" else 0.0)
    if s.sp and t > 1 and s.recompute != "full":
        # torch's sequence parallelism all-gathers the attention's and the MLP's input and the
        # projections save that whole tensor for their weight gradients (Megatron gathers it
        # again in backward instead): two 16-bit [tokens, hidden] tensors, counted above as
        # 1/t of one each (measured with `loom train --simulate`: 8B tp 2, 405B tp 8).
        kept += 2 * sbh * (4 if s.precision == "fp32" else 2) * (1 - 1 / t)
    if _autocast_copies(s) and s.recompute == "none":
        kept += 2 * model.matmul_params_per_layer() / t  # bf16 weight copies saved by matmuls
    return kept


def _fsdp_casts(s: Strategy) -> bool:
    """FSDP gathers 16-bit weights and the whole block computes in 16 bits (no autocast)."""
    return s.precision != "fp32" and (s.zero_stage >= 3 or s.offload == "params")


def _autocast_copies(s: Strategy) -> bool:
    """Under autocast (16-bit compute without FSDP's own cast), every matmul saves a 16-bit
    copy of its weight for backward."""
    return s.precision != "fp32" and s.zero_stage < 3 and s.offload != "params"


# Measured with torch's MemTracker on Loom's Llama block (loom.planner.calibrate.
# measure_activations) at the reference shape below: bytes kept per token per hidden unit in
# fp32, and how many of those [tokens, hidden] tensors stay fp32 under bf16 autocast (from the
# bf16 measurement). Other shapes scale by the count of saved tensors in `_llama_units`.
LLAMA_REFERENCE = ModelShape(6, 512, 8, 4, 1408, 8192, 256)
LLAMA_FP32_BYTES = {"none": 80.1, "selective": 46.1, "full": 4.0}
LLAMA_FP32_UNDER_AUTOCAST = {"none": 7.0, "selective": 1.0, "full": 1.0}
# Under FSDP's 16-bit cast only the norms' fp32 upcasts stay fp32 (measured on the Llama-3 8B
# shape with `loom train --simulate`, per-layer difference of 2 and 4 blocks).
LLAMA_FP32_UNDER_FSDP = {"none": 2.75, "selective": 0.0, "full": 0.0}


def _llama_units(model: ModelShape, recompute: str) -> tuple[float, float]:
    """Saved [tokens, hidden]-sized tensors of a Llama block: (replicated by tensor parallelism
    unless sequence-parallel, total). Full recomputation keeps the block input; selective keeps
    it, the q/k/v, attention and o outputs, and the gate, up and down outputs; none keeps the
    norms' inputs and outputs, the projections' inputs, q/k/v, the attention output and its
    copy, and the MLP's gate, up, activation and product."""
    kv = model.kv_dim / model.hidden
    ffn = model.active_ffn / model.hidden
    if recompute == "full":
        return 1.0, 1.0
    if recompute == "selective":
        return 2.0, 2.0 + (2 + 2 * kv) + 2 * ffn
    return 4.0, 4.0 + (5 + 4 * kv) + 4 * ffn


def layers_in_flight(model: ModelShape, s: Strategy) -> float:
    """Layer-activations the first pipeline stage holds at its peak, in units of one layer for
    one micro-batch (Korthikanti et al.: 1F1B keeps L layers' worth whatever p is)."""
    m = s.microbatches
    per_stage = max(rank_layers(model.layers, s.pp, s.virtual_stages))
    if s.pp == 1:
        return per_stage
    if s.schedule == "GPipe":
        return per_stage * m
    in_flight = per_stage * min(s.pp, m)
    if s.schedule == "Interleaved1F1B" and s.virtual_stages > 1:
        return model.layers * (1 + (s.pp - 1) / (s.pp * s.virtual_stages))
    return in_flight


def activations(model: ModelShape, s: Strategy) -> float:
    per_layer = activation_bytes_per_layer(model, s)
    sbh = model.seq_len / s.cp * s.micro_batch * model.hidden
    width = 2 if model.arch == "gpt" else BYTES[s.precision]
    extra = width * sbh * s.pp / s.tp  # the first stage's embedding outputs in flight
    if s.pp == 1:  # the same device also holds the output layer and the loss
        if model.arch == "gpt":
            extra = sbh / s.tp * (s.pp + 4 * (1 + model.vocab / model.hidden))
        else:
            extra += log_softmax_bytes(model, s)  # the logits themselves are freed
            # Measured at tp 1; sequence parallelism runs the final norm and the casts on a
            # sequence shard and gathers the head's 16-bit input whole.
            shard = sbh / s.tp if s.sp else sbh
            if s.precision != "fp32":  # the head's 16-bit input and casts
                extra += 2 * sbh + 4 * shard if s.sp else 6 * sbh
            extra += 8 * shard  # the final norm's fp32 input and output
    return per_layer * layers_in_flight(model, s) + extra


def log_softmax_bytes(model: ModelShape, s: Strategy) -> float:
    """The loss's fp32 log-softmax of one micro-batch's vocabulary shard, saved for backward."""
    return model.seq_len / s.cp * s.micro_batch * model.vocab / s.tp * 4


def accumulation_runs(s: Strategy) -> int:
    """Forward-backward runs per optimizer step: micro-batches without pipeline parallelism,
    schedule runs with it."""
    return s.microbatches // pipeline_microbatches(s)


def loss_buffers(model: ModelShape, s: Strategy) -> float:
    """Loom's loss backward, at its start on the device that computes the loss: besides the
    saved fp32 log-softmax (an activation), two fp32 logits-sized buffers of torch's fused
    cross-entropy backward, three of loss-parallel's unfused one under tensor parallelism
    (torch.distributed.tensor.parallel.loss), as `loom train --simulate` shows at 8B (tp 1, 2;
    cp 4) and 70B (tp 8) widths."""
    if s.framework != "loom" or s.pp > 1 or model.arch != "llama":
        return 0.0
    return log_softmax_bytes(model, s) * (3 if s.tp > 1 else 2)


def pipeline_fsdp_buffers(model: ModelShape, s: Strategy, psi: float) -> float:
    """What a pipeline rank under FSDP holds from its first backward to the end of the schedule
    run, as torch's pipeline stages run FSDP (and `loom train` with them): its `psi`
    parameters stay gathered in 16 bits (no reshard after backward) with their unsharded
    gradients accumulated in fp32 (FSDP's reduce dtype) until the one reduce-scatter at the
    end; on the first stage under tensor parallelism, DTensor's backward of the
    vocabulary-parallel embedding makes the whole [vocab, hidden] gradient in 16 bits and its
    fp32 copy for that accumulation. By then the first backward has freed one micro-batch's
    activations (the caller subtracts them)."""
    width = BYTES[s.precision if s.precision != "fp8" else "bf16"]
    held = psi * (width + 4)
    if s.tp > 1:
        held += model.vocab * model.hidden * (width + 4)
    return held


def _in_flight(s: Strategy) -> int:
    """Micro-batches the first pipeline stage holds when its first backward starts."""
    held = s.microbatches if s.schedule == "GPipe" else min(s.pp, s.microbatches)
    return max(1, held)  # a strategy asking only about state bytes may leave the batch unset


def estimate(model: ModelShape, hw: Hardware, s: Strategy) -> Memory:
    psi = params_per_device(model, s)
    if s.finetune == "full":
        experts = max(rank_layers(model.layers, s.pp, s.virtual_stages)) * (
            model.expert_params_per_layer() / (1 if s.framework == "loom" else s.tp)
        )
        weights, grads, optim = model_state_bytes(psi, s, experts)
        padding = padded_share(model, s)
        weights, grads, optim = weights * padding, grads * padding, optim * padding
        if s.framework == "loom" and s.tp > 1 and s.zero_stage < 3:
            # Without FSDP, DTensor's backward of the vocabulary-parallel embedding leaves its
            # gradient whole on every tensor-parallel rank (measured, tests/test_parallel.py).
            grads += model.vocab * model.hidden * (1 - 1 / s.tp) * state_bytes(s)[1]
    else:
        weights, grads, optim = adapter_state_bytes(model, psi, s)
    host = disk = 0.0
    if s.offload == "optimizer":
        trained = psi if s.finetune == "full" else lora_params(model, s)
        host, disk = optimizer_offload(model, hw, s, trained)
        optim = 0.0
    elif s.offload == "params":
        host, weights, grads, optim = weights + grads + optim, 0.0, 0.0, 0.0
    fsdp = s.zero_stage >= 3 or s.offload == "params"
    sharded_grads = grads
    if s.framework == "loom" and fsdp and accumulation_runs(s) == 1:
        # The device's peak is at the start of the step's only backward, where every
        # activation is kept: the optimizer set the gradients to None and FSDP has not yet
        # reduce-scattered any (under pipeline parallelism it reduces once, at the end of the
        # schedule run). Host memory (offload) still holds them at the optimizer step.
        grads = 0.0
    acts = activations(model, s)
    if s.activation_offload:
        moved = offloaded_activations(model, s)
        acts -= moved
        host += moved
    blocks = outer = 0.0
    if fsdp:
        # Gathered weights of the running block and the prefetched one (frozen or not: FSDP
        # gathers a LoRA run's base like any weight), and their unsharded gradients before the
        # reduce-scatter (with adapters, only the adapters have gradients).
        width = BYTES[s.precision if s.precision != "fp8" else "bf16"]
        whole = unsplit_moe_params(model, s)  # not split by tp
        experts = model.expert_params_per_layer() if s.ep > 1 else 0.0  # held, not gathered
        split = model.layer_params() - whole
        block = (split / s.tp + whole - experts / (1 if s.framework == "loom" else s.tp)) * width
        trained = block if s.finetune == "full" else lora_params_per_layer(model, s) * width
        blocks = 2 * (block + trained)
        if s.framework == "loom":
            # Loom's root group (embedding, final norm, head) stays gathered from forward to
            # the end of backward, with its unsharded gradients when it trains.
            outer = outer_params_per_device(model, s) * width
    trains_outer = s.finetune == "full"

    def moment(grads: float, acts: float, buffers: float) -> Memory:
        other = hw.runtime_gb * GB + buffers + FRAGMENTATION * (weights + grads + optim + acts)
        return Memory(weights, grads, optim, acts, other, host, disk)

    if s.framework == "loom" and fsdp and s.pp == 1 and trains_outer and model.arch == "llama":
        return max(
            _fsdp_backward_moments(model, s, moment, acts, blocks, outer, (grads, sharded_grads)),
            key=lambda m: m.total,
        )
    buffers = blocks + (2 * outer if trains_outer else outer)
    if fsdp and s.pp > 1 and s.framework == "loom":
        buffers = max(buffers, pipeline_fsdp_buffers(model, s, psi) - acts / _in_flight(s))
    return moment(grads, acts, buffers + loss_buffers(model, s))


def _fsdp_backward_moments(
    model: ModelShape,
    s: Strategy,
    moment: Callable[[float, float, float], Memory],
    acts: float,
    blocks: float,
    outer: float,
    grads: tuple[float, float],
) -> list[Memory]:
    """A Loom FSDP backward as `loom train --simulate` shows it: candidate peaks instead of
    the union of every buffer. The loss's backward (all activations, the root group's gathered
    weights, the loss's buffers); the last block's backward (the log-softmax freed, the root
    group's gradients made, two blocks gathered with their gradients, and the block's
    recomputed activations with their gradients: twice what recomputation spared, as measured
    at 70B and 405B widths); under tensor parallelism, the embedding's backward at the very end
    (activations freed). `grads` are the gradient bytes held during backward and at its end."""
    during, after = grads
    loss = moment(during, acts, outer + loss_buffers(model, s))
    recomputed = activation_bytes_per_layer(model, replace(s, recompute="none"))
    recomputed -= activation_bytes_per_layer(model, s)
    held = acts - log_softmax_bytes(model, s) + 2 * recomputed
    last_block = moment(during, held, 2 * outer + blocks)
    if s.tp == 1:
        return [loss, last_block]
    end = moment(after, 0.0, embedding_backward_buffers(model, s))
    return [loss, last_block, end]


def embedding_backward_buffers(model: ModelShape, s: Strategy) -> float:
    """The last moment of a tensor-parallel FSDP backward (measured with `loom train
    --simulate`; the peak when activations are small, as under full recomputation): the root
    group's weights still gathered with their unsharded gradients, and DTensor's backward of
    the vocabulary-parallel embedding, which makes the whole [vocab, hidden] gradient in 16
    bits before its shard's fp32 copy for the reduce-scatter. The blocks' gradients are
    reduced to shards by then and their activations freed."""
    width = BYTES[s.precision if s.precision != "fp8" else "bf16"]
    outer = outer_params_per_device(model, s) * width
    embedding = model.vocab * model.hidden
    return 2 * outer + embedding * width + embedding / s.tp * 4


# Host bytes per trained parameter under offload=optimizer (loom.train.offload.OffloadAdamW):
# Adam's two fp32 moments and the fp32 master weight the CPU steps (none when the device is
# the CPU and the weights are fp32: they are their own master); the NVMe tier keeps them in
# files and holds NVME_WINDOW_BLOCKS blocks' worth in host memory (the chunk stepped, the one
# prefetched).
MOMENT_BYTES = 8
MASTER_BYTES = 4
NVME_WINDOW_BLOCKS = 2
ACTIVATION_WINDOW_BLOCKS = 2  # blocks whose activations are on the device: computed, copied


def offload_state_bytes(hw: Hardware, s: Strategy) -> float:
    """Host (or file) bytes per offloaded parameter: the moments, and an fp32 master unless
    the parameters already are fp32 host tensors (Loom's on a CPU)."""
    own_master = hw.host_device and (s.framework == "loom" or s.precision == "fp32")
    return MOMENT_BYTES + (0 if own_master else MASTER_BYTES)


def optimizer_offload(
    model: ModelShape, hw: Hardware, s: Strategy, trained: float
) -> tuple[float, float]:
    """offload=optimizer: host and disk bytes per device. The device keeps its weights and
    gradients as they are (Loom: fp32; Megatron-style: 16-bit) and no optimizer state; the
    moments and an fp32 master move to host memory, sharded as the optimizer state is (ZeRO
    stage >= 1: each rank owns 1/dp of its `trained` parameters). With offload_nvme they live
    in files and host memory holds a window of them."""
    owned = trained / (s.state_shards if s.zero_stage >= 1 else 1)
    if not s.offload_nvme:
        return owned * offload_state_bytes(hw, s), 0.0
    disk = owned * offload_state_bytes(hw, s)
    blocks = max(rank_layers(model.layers, s.pp, s.virtual_stages))
    return disk * min(1.0, NVME_WINDOW_BLOCKS / blocks), disk


def offloaded_activations(model: ModelShape, s: Strategy) -> float:
    """activation_offload: the saved activations that wait in host memory at the device's
    peak -- all the blocks' in flight but the ACTIVATION_WINDOW_BLOCKS still on the device
    (the one computing, the one being copied). Recomputation first decides what a block saves;
    the embedding outputs, logits and loss stay on the device."""
    in_flight = layers_in_flight(model, s)
    kept = min(in_flight, ACTIVATION_WINDOW_BLOCKS)
    return activation_bytes_per_layer(model, s) * (in_flight - kept)


def host_share(hw: Hardware) -> float:
    """Devices of one node this job uses, as a fraction of the node: a job on part of a node
    (one GPU of eight) gets that share of its host memory, disk and CPUs."""
    return min(hw.devices, hw.devices_per_node) / hw.devices_per_node


def refusal(memory: Memory, hw: Hardware) -> str | None:
    """Which memory tier this layout overfills, or None when it fits every tier."""
    used = min(hw.devices, hw.devices_per_node)
    if memory.total > hw.memory_gb * GB:
        return f"needs {memory.total / GB:.1f} GB per device of the {hw.memory_gb:g} GB devices"
    host = hw.host_memory_gb * host_share(hw)
    if memory.host * used > host * GB:
        return (
            f"keeps {memory.host * used / GB:.0f} GB in host memory on {used} devices of a node, "
            f"which has {host:.0f} GB for them (hardware.host_mem_gb, per node)"
        )
    disk = hw.disk_gb * host_share(hw)
    if memory.disk * used > disk * GB:
        return (
            f"keeps {memory.disk * used / GB:.0f} GB on disk on {used} devices of a node, which "
            f"has {disk:.0f} GB for them (hardware.disk_gb, per node)"
        )
    return None


def fits(memory: Memory, hw: Hardware) -> bool:
    return refusal(memory, hw) is None
