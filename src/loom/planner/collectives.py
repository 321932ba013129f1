"""The collectives Loom's real code issues in one optimizer step, as the planner predicts them.

For the most loaded rank (the one holding the first pipeline stage), per optimizer step: FSDP2
all-gathers each block's weights (this rank's tensor-parallel share, in the compute dtype)
before its forward and again before its backward when it resharded after forward, and the
root group (embedding, final norm, head) once; it reduce-scatters every group's gradients in
the reduce dtype after each backward; HSDP then all-reduces the reduced shard across replicas.
Tensor parallelism with sequence parallelism all-gathers the sequence-sharded activations
before attention and the MLP and reduce-scatters their outputs (the reverse in backward; full
recomputation repeats most of the forward's). Pipeline stages send activations forward and their
gradients back once per micro-batch. DDP all-reduces all gradients after each backward.
`bytes` is the size of the unsharded tensor of each call (all-gather output, reduce-scatter
input), summed: `loom train --simulate` reports the same for Loom's real code.

Scalars (the loss mean, the gradient norm, vocabulary-parallel loss statistics) are left out:
they are a few bytes per call. Pure Python: the planner must not need torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from loom.planner.spec import Hardware, ModelShape, Strategy, unsplit_moe_params

BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 2}  # fp8 runs matmuls only; tensors are bf16
REDUCE_BYTES = 4.0  # Loom reduces gradients in fp32 (parallel.mixed_precision.reduce_dtype)


@dataclass(frozen=True)
class Collective:
    kind: str  # all_gather | reduce_scatter | all_reduce | send | recv | broadcast | all_to_all
    group: str  # mesh dimension: dp_shard, dp_replicate, tp, pp, cp
    count: int  # calls per optimizer step on one rank
    bytes: float  # summed size of the unsharded tensor of each call


def collectives(model: ModelShape, hw: Hardware, s: Strategy) -> list[Collective]:
    """What one optimizer step of rank 0 moves, by kind and mesh dimension."""
    del hw  # where the bytes go, not how fast: the cost model times them
    out: list[Collective] = []
    fsdp = s.zero_stage >= 3 or s.offload == "params"
    accum = s.global_batch // (s.dp * s.micro_batch * pipeline_microbatches(s))
    chunks = pipeline_microbatches(s)  # micro-batches per schedule run
    layers = model.layers // s.pp  # this rank's blocks (all its stages together)
    compute = BYTES[s.precision]
    tokens = s.micro_batch * model.seq_len / s.cp  # per pipeline micro-batch
    # The activations between blocks: 16-bit when FSDP casts the weights, fp32 under autocast
    # (the residual stream stays fp32).
    width = compute if fsdp else 4

    # (loom train: an MoE layer is whole on every tp rank; with ep its experts are held, not
    # gathered or reduced by FSDP)
    replicated = model.replicated_params_per_layer() + unsplit_moe_params(model, s)
    block = (model.layer_params() - replicated) / s.tp + replicated
    if s.ep > 1:
        block -= model.expert_params_per_layer() / (1 if s.framework == "loom" else s.tp)
    embedding = model.embedding_params() / s.tp
    head = (model.head_params() - model.hidden) / s.tp + model.hidden
    outer = embedding + (head if s.pp == 1 else 0.0)  # rank 0: the embedding, and the head
    if fsdp:
        groups = layers + 1
        if s.pp == 1:
            # The trainer runs forward and backward per micro-batch. Blocks reshard after
            # forward (parallel.fsdp_reshard_after_forward, the default) and are gathered again
            # for backward; the root group stays gathered; gradients are reduced every time.
            runs, block_gathers = accum, 2
        else:
            # Under a schedule (as torch's stages drive FSDP) blocks still reshard after each
            # forward but stay gathered after a backward, and gradients are reduced once per
            # run: a block is gathered for each of its micro-batches' forwards (in GPipe and
            # 1F1B order, each forward that follows a backward finds it gathered, each
            # backward that follows a forward does not) and once more: chunks + 1 times.
            runs, block_gathers = accum, chunks + 1
        gathers = runs * (1 + layers * block_gathers)
        padded_block, padded_outer = fsdp_padding(model, s)
        block, outer = block * padded_block, outer * padded_outer
        gathered = runs * (block_gathers * layers * block + outer)
        # With context parallelism FSDP shards over the dp_shard and cp ranks together.
        shards = "dp_shard" if s.cp == 1 else "dp_shard_cp"
        out.append(Collective("all_gather", shards, gathers, gathered * compute))
        reduces = runs * groups
        grads = runs * (layers * block + outer) * REDUCE_BYTES
        out.append(Collective("reduce_scatter", shards, reduces, grads))
        if s.dp > s.shard_ranks:
            out.append(Collective("all_reduce", "dp_replicate", reduces, grads / s.state_shards))
    elif s.dp > 1:
        grads = (layers * block + outer) * REDUCE_BYTES
        out.append(Collective("all_reduce", "dp_replicate", accum * chunks, grads * accum))
    if s.tp > 1 and s.sp:
        # Per block, forward and backward each all-gather twice and reduce-scatter twice; the
        # embedding's output and the head's input add one of each on the stages holding them.
        # Recomputation (selective too: collectives are not among the ops it keeps) runs the
        # block's forward again up to its last saved tensor: two all-gathers, one reduce-scatter.
        ends = 2 if s.pp == 1 else 1
        again = s.recompute != "none"
        # An MoE block's layer takes the gathered tokens and hands back its shard, with no
        # reduce-scatter: two fewer per block (forward, backward).
        moe = 2 * model.moe_layers / model.layers if s.framework == "loom" else 0.0
        for kind, per_block in (
            ("all_gather", 4 + 2 * again),
            ("reduce_scatter", 4 + again - moe),
        ):
            calls = accum * chunks * (per_block * layers + ends)
            out.append(Collective(kind, "tp", calls, calls * tokens * model.hidden * width))
    if s.cp > 1:
        # Ring attention: one permutation (an all-to-all) per hop of a block's keys and values
        # round the cp ranks: cp − 1 hops in forward (again when the block is recomputed) and
        # in backward, where their fp32 gradients take cp hops home. Per micro-batch the loss
        # all-reduces the number of targets over cp (it is token-weighted).
        hop = tokens * (model.kv_dim + model.kv_value_dim) / s.tp
        runs = accum * chunks * layers
        forward = (s.cp - 1) * (2 + (s.recompute != "none"))
        calls, volume = runs * (forward + s.cp), runs * (forward * compute + s.cp * 4) * hop
        out.append(Collective("all_to_all", "cp", calls, volume))
        if s.pp == 1:  # the loss is rank 0's
            out.append(Collective("all_reduce", "cp", accum * chunks, accum * chunks * 8))
    if s.ep > 1 and model.moe_layers:
        # Each MoE layer sends every token's top-k copies to their experts' ranks and back:
        # two all-to-alls in forward, two in backward, two more when recomputed.
        again = s.recompute != "none"
        calls = accum * chunks * round(layers * model.moe_layers / model.layers) * (4 + 2 * again)
        routed = tokens * model.top_k * model.hidden * compute * s.moe_imbalance
        group = "dp_shard" if s.cp == 1 else "dp_shard_cp"
        out.append(Collective("all_to_all", group, calls, calls * routed))
    if s.pp > 1:
        stages = s.virtual_stages
        # Rank 0 holds stages 0, pp, 2·pp, ...: each sends its output on (all do: the last
        # stage is another rank's) and all but stage 0 send their input's gradient back.
        calls = accum * chunks * (2 * stages - 1)
        # With sequence parallelism a stage's output is its sequence shard.
        volume = calls * tokens * model.hidden * width / (s.tp if s.sp else 1)
        out.append(Collective("send", "pp", calls, volume))
        out.append(Collective("recv", "pp", calls, volume))
    return out


def pipeline_microbatches(s: Strategy) -> int:
    """Micro-batches of one schedule run: Loom's default, one per stage, when the step's
    micro-batches come in whole runs of that; else the whole step in one run."""
    if s.pp == 1:
        return 1
    stages = s.pp * s.virtual_stages
    return stages if s.microbatches % stages == 0 else s.microbatches


def fsdp_padding(model: ModelShape, s: Strategy) -> tuple[float, float]:
    """How much larger FSDP2's shards are than an even split, for a block and for the root group
    (embedding, head, final norm): it splits each tensor's first dimension into equal chunks,
    padding the last, so a tensor of fewer rows than ranks costs every rank a whole row (at
    tp 8 × dp_shard 2,048 Llama-3 405B's K/V projections, 128 rows each, take 16x their share)."""
    n = s.state_shards
    fsdp2 = s.framework in ("loom", "pytorch") and model.arch == "llama" and not model.moe_layers
    if n == 1 or s.zero_stage < 3 or not fsdp2:
        return 1.0, 1.0
    t, h = s.tp, model.hidden
    q, kv, f = model.q_dim // t, model.kv_dim // t, model.ffn_hidden // t
    block = [(q, h), (kv, h), (kv, h), (h, q), (f, h), (f, h), (h, f), (h, 1), (h, 1)]
    root = [(model.vocab // t, h)] * (1 if model.tied else 2) + [(h, 1)]

    def factor(tensors: list[tuple[int, int]]) -> float:
        padded = sum(math.ceil(rows / n) * cols for rows, cols in tensors)
        return padded / sum(rows * cols / n for rows, cols in tensors)

    return factor(block), factor(root)
