"""`loom plan`: the memory and time models against published runs, the search, the CLI contract
and bad input. Speed of the search is measured in BENCHMARKS.md, not asserted here."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from loom.core.errors import LoomError
from loom.planner import published, validation
from loom.planner.cost import DEFAULT_CALIBRATION
from loom.planner.layout import config_overrides
from loom.planner.memory import activations as planner_activations
from loom.planner.search import candidates, evaluate, plan
from loom.planner.spec import Strategy, _gpu_key, parse_spec

RECORDS = published.load_records()


VALIDATION = validation.load_cases()
HELD_OUT = [c for c in VALIDATION if not c.fitted and c.scored]


def test_validation_set_is_broad_and_split_before_fitting() -> None:
    """At least 60 published runs from at least 4 sources and 3 GPU generations, FSDP-style and
    Megatron-style, up to 128K tokens; a third of each source is fitted on, never a record the
    accuracy is reported on."""
    assert len(VALIDATION) >= 60
    assert len({c.source for c in VALIDATION}) >= 4
    generations = {c.spec.hardware.name[:4] for c in VALIDATION}
    assert {"a100", "h100", "h200"} <= generations
    strategies = [c.spec.strategy for c in VALIDATION if c.spec.strategy is not None]
    assert any(s.zero_stage == 3 and s.tp == 1 and s.pp == 1 for s in strategies)
    assert any(s.tp > 1 and s.pp > 1 for s in strategies)
    assert max(c.spec.model.seq_len for c in VALIDATION) >= 128 * 1024
    fitted = [c for c in VALIDATION if c.fitted]
    assert 0.25 < len(fitted) / len(VALIDATION) < 0.4
    assert {c.source for c in fitted} == {c.source for c in VALIDATION}
    assert not {c.id for c in fitted} & {c.id for c in HELD_OUT}


def test_held_out_throughput_within_10_percent_median_none_above_35() -> None:
    """The issue's target, on the records the calibration was not fitted on."""
    rows = validation.results(HELD_OUT)
    median, worst = validation.summary(rows)
    assert len(rows) >= 60
    assert median <= 0.10, median
    assert worst <= 0.35, max(rows, key=lambda r: abs(r.error))


def test_calibration_is_the_fit_on_the_fit_records() -> None:
    """DEFAULT_CALIBRATION's fitted constants are what fitting the fit records gives (rounded
    for the source): refitting from them moves none by more than 5%."""
    fitted = [c for c in VALIDATION if c.fitted]
    refit = validation.fit_calibration(fitted)
    for name in validation.FITTED:
        default, again = getattr(DEFAULT_CALIBRATION, name), getattr(refit, name)
        assert again == pytest.approx(default, rel=0.05, abs=1e-6), name


@pytest.mark.parametrize(
    "rows",
    [
        published.megatron_throughput(RECORDS),
        published.korthikanti_times(RECORDS),
        published.training_days(RECORDS),
    ],
    ids=["megatron-table1", "korthikanti-table5", "narayanan-days"],
)
def test_older_published_runs_held_out_too(rows: list[published.Row]) -> None:
    """Megatron-LM 2021 and Korthikanti 2022 (shared/reference): no constant is fitted on them."""
    errors = [abs(r.error) for r in rows]
    assert statistics.median(errors) <= 0.10
    assert max(errors) <= 0.35


def test_regression_korthikanti_activation_formulas_transcribed() -> None:
    """A transcription check, not validation: the memory model restates the paper's formulas."""
    rows = published.korthikanti_activations()
    assert len(rows) == 6
    assert all(r.predicted == pytest.approx(r.published, rel=1e-12) for r in rows)


def test_regression_zero_table1_model_states_transcribed() -> None:
    """A transcription check, not validation: ZeRO's Table 1 is its own formula, printed."""
    rows = published.zero_memory(RECORDS)
    assert len(rows) == 54
    for row in rows:
        record = RECORDS[row.record.split()[0]]
        column = row.record.split()[1]
        exact = record["derived"][f"formula_{column}"]  # the paper's formula, unrounded
        assert row.predicted == pytest.approx(exact, rel=1e-3, abs=5e-4)
        # Against the printed table: 2 %, or the rounding of the printed digits.
        printed = row.published
        digits = len(str(printed).split(".")[1]) if "." in str(printed) else 0
        assert abs(row.predicted - printed) <= max(0.02 * printed, 0.5 * 10**-digits)


def test_search_finds_a_fitting_layout_for_405b_on_16k_gpus() -> None:
    spec = parse_spec(
        {
            "model": {"preset": "llama3-405b", "seq_len": 8192},
            "hardware": {"gpu": "h100", "n_gpus": 16384},
            "search": {"global_batch": 2048},
            "training": {"tokens": 15.6e12},
        }
    )
    best, ranked = plan(spec)
    assert best.fits and best.strategy.devices == 16384
    assert [p.tokens_per_s for p in ranked] == sorted(
        (p.tokens_per_s for p in ranked), reverse=True
    )
    assert all(p.memory.total <= 80e9 for p in ranked)
    assert 0.2 < best.mfu < 0.7 and 20 < best.days(15.6e12) < 400
    # Uneven pipeline splits are searched (126 layers on 4, 8 or 16 stages), and no winner
    # idles a third of its step in the bubble with one micro-batch per replica.
    assert any(p.strategy.pp > 2 for p in ranked)
    assert best.time.bubble < 0.2 * best.time.total
    # loom train splits sequences with the model sharded over the dp and cp ranks
    assert all(p.strategy.cp == 1 or p.strategy.zero_stage == 3 for p in ranked)


def test_uneven_pipeline_splits_as_loom_train_makes_them() -> None:
    """The planner's layers per pipeline rank are those of loom.parallel.pipeline's split, and
    the busiest rank sets the step time and the memory."""
    from loom.parallel.dims import ParallelDims
    from loom.parallel.pipeline import stage_layer_ranges, stages_of_rank
    from loom.planner.memory import rank_layers

    for layers, pp, v in ((126, 16, 1), (70, 12, 1), (126, 8, 2), (32, 4, 3), (80, 16, 4)):
        dims = ParallelDims(
            pp=pp, dp_replicate=1, dp_shard=1, tp=1, stages_per_rank=v, microbatches=pp
        )
        ranges = stage_layer_ranges(layers, pp * v, [])
        loom = [
            sum(
                len(ranges[i])
                for i in stages_of_rank(r, dims, "Interleaved1F1B" if v > 1 else "1F1B")
            )
            for r in range(pp)
        ]
        assert rank_layers(layers, pp, v) == loom
    spec = parse_spec(
        {
            "model": "llama3-405b",
            "hardware": {"gpu": "h100", "n_gpus": 1024},
            "strategy": {"tp": 8, "pp": 16, "micro_batch": 1, "global_batch": 128},
        }
    )
    even = parse_spec(
        {
            "model": "llama3-405b",
            "hardware": {"gpu": "h100", "n_gpus": 1008},
            "strategy": {"tp": 8, "pp": 14, "micro_batch": 1, "global_batch": 72},
        }
    )
    p16, p14 = (evaluate(s.model, s.hardware, s.strategy) for s in (spec, even))
    # 126 / 16: the busiest rank holds 8 layers, 126 / 14 gives 9 to each.
    assert max(rank_layers(126, 16)) == 8
    assert p16.memory.params < p14.memory.params * 8 / 9 * 1.01


def test_pipeline_bubble_with_fewer_micro_batches_than_stages() -> None:
    """With m < pp a micro-batch still crosses all pp stages: interleaving cannot hide that."""
    from loom.planner.cost import step_time

    spec = parse_spec({"model": "llama3-8b", "hardware": {"gpu": "h100", "n_gpus": 8}})
    m, hw = spec.model, spec.hardware
    one = step_time(m, hw, Strategy(pp=8, global_batch=1))
    interleaved = step_time(
        m, hw, Strategy(pp=8, global_batch=1, virtual_stages=4, schedule="Interleaved1F1B")
    )
    # One micro-batch: (pp − 1) micro-batch times idle, whatever v is.
    assert interleaved.bubble == pytest.approx(one.bubble, rel=0.05)
    many = step_time(
        m, hw, Strategy(pp=8, global_batch=32, virtual_stages=4, schedule="Interleaved1F1B")
    )
    assert many.bubble / many.compute < one.bubble / one.compute / 8


def test_context_parallelism_is_costed_and_never_beats_physics() -> None:
    """cp splits each sequence: attention FLOPs per rank fall by cp (local queries against all
    keys), K/V ring passes appear, and even at 256K tokens MFU stays below 1."""
    from loom.planner.cost import step_time

    raw = {
        "model": {"preset": "llama3-8b", "seq_len": 262144},
        "hardware": {"gpu": "h100", "n_gpus": 8},
    }
    spec = parse_spec(raw)
    m, hw = spec.model, spec.hardware
    common = {"framework": "pytorch", "recompute": "full", "zero_stage": 3}
    plans = {
        cp: evaluate(m, hw, Strategy(cp=cp, dp=8 // cp, global_batch=8 // cp, **common))
        for cp in (1, 2, 4, 8)
    }
    for p in plans.values():
        assert 0 < p.mfu < 1
    # Each rank computes 1/cp of a sequence: matmuls and attention (its queries against every
    # key, causal) both fall by cp.
    for cp in (2, 4, 8):
        assert plans[cp].time.compute == pytest.approx(plans[1].time.compute / cp, rel=0.05)
    slow_link = replace(hw, intra_node_gbps=1.0)
    exposed = step_time(m, slow_link, Strategy(cp=8, global_batch=1, **common))
    assert exposed.context_parallel > 0
    with pytest.raises(LoomError, match="shards the model over the dp and cp ranks"):
        parse_spec({**raw, "strategy": {"cp": 2, "tp": 2, "zero_stage": 0}})
    parse_spec({**raw, "strategy": {"cp": 2, "tp": 2, "pp": 2, "zero_stage": 3}})
    best, ranked = plan(parse_spec({**raw, "search": {"framework": "pytorch", "global_batch": 8}}))
    # at 256K tokens splitting sequences is among the fastest layouts (tp 4 with sequence
    # parallelism ties with it)
    assert any(p.strategy.cp > 1 and p.mfu >= 0.99 * best.mfu for p in ranked)
    # what loom train runs: cp over FSDP ranks, beside tp and pp too, offered with the
    # command that runs it
    split = [s for s in candidates(m, hw, Strategy(global_batch=8), 8) if s.cp > 1]
    assert {s.cp for s in split} == {2, 4, 8}
    assert all(s.zero_stage == 3 for s in split)
    assert {(s.tp > 1, s.pp > 1) for s in split} == {(a, b) for a in (0, 1) for b in (0, 1)}
    assert config_overrides(m, split[0])["parallel.cp"] == str(split[0].cp)


def test_a_prediction_faster_than_the_hardware_is_an_error_not_an_answer() -> None:
    """The physics check fails loudly: here a layout nobody validated (no micro-batch per
    replica) would take no time."""
    from loom.planner.search import PhysicsError

    spec = parse_spec({"model": "llama3-8b", "hardware": {"gpu": "h100", "n_gpus": 16}})
    broken = Strategy(dp=16, global_batch=8)  # 8 sequences over 16 replicas: 0 micro-batches
    with pytest.raises(PhysicsError):
        evaluate(spec.model, spec.hardware, broken)
    # ...while every layout the search offers passes it.
    _, ranked = plan(spec)
    assert all(0 < p.mfu <= 1 for p in ranked)


def test_70b_on_24gb_cards_qlora_on_one_device_lora_offloaded_full_not_at_all() -> None:
    def answer(finetune: str, gpu: str = "rtx4090", n_gpus: int = 2) -> object:
        raw = {
            "model": {"preset": "llama3-70b", "seq_len": 1024},
            "hardware": {"gpu": gpu, "n_gpus": n_gpus},
            "search": {"finetune": finetune, "global_batch": 8},
        }
        return plan(parse_spec(raw))

    # loom finetune runs QLoRA in one process, and FSDP's host offload does not take NF4.
    with pytest.raises(LoomError, match="runs QLoRA in one process.*--gpus 1"):
        answer("qlora")
    with pytest.raises(LoomError, match="does not fit on one 24 GB rtx4090"):
        answer("qlora", n_gpus=1)  # ~37 GB of NF4 projections alone
    best, _ = answer("qlora", gpu="h100", n_gpus=1)
    assert best.fits and best.memory.total <= 80e9 and best.strategy.offload == "none"
    # A 282 GB fp32 base: only with the weights in host memory, and a 512 GB 4-GPU node gives
    # two cards 256 GB of it, too little; four cards have the whole node.
    with pytest.raises(LoomError, match=r"needs ≥ 4 of these devices"):
        answer("lora")
    lora, _ = answer("lora", n_gpus=4)
    assert lora.fits and lora.strategy.offload == "params" and lora.memory.host > 60e9
    assert (lora.strategy.tp, lora.strategy.pp, lora.strategy.dp) == (1, 1, 4)
    with pytest.raises(LoomError, match=r"needs ≥ \d+ of these devices"):
        answer("full")


# Llama-3-70B counted by hand: 80 blocks of q, k, v, o (8 KV heads of 128), a SwiGLU MLP and
# two norms; untied embedding and head over 128,256 tokens; the final norm.
L70, H70, KV70, F70, V70 = 80, 8192, 1024, 28672, 128256
NORMS_70B = L70 * 2 * H70 + H70  # not split by tensor parallelism
PARAMS_70B = L70 * (2 * H70 * H70 + 2 * H70 * KV70 + 3 * H70 * F70) + NORMS_70B + 2 * V70 * H70
NF4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes, an int8 scale per 64, an fp32 per 256 scales


def lora_70b(rank: int) -> int:
    """r · (d_in + d_out) for q, k, v, o, gate, up and down in every block."""
    h, kv, f = H70, KV70, F70
    return L70 * rank * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + f) + (f + h))


def test_70b_counted_by_hand_is_the_preset() -> None:
    spec = parse_spec({"model": "llama3-70b", "hardware": {"gpu": "h100", "n_gpus": 1}})
    assert PARAMS_70B == spec.model.params() == 70_553_706_496


def test_fsdp_shards_a_lora_runs_frozen_base() -> None:
    """Loom applies fully_shard to the whole model: frozen weights are sharded like any other,
    only the adapters have gradients and Adam state (fp32 weights, grads, 2 moments)."""
    spec = parse_spec({"model": "llama3-70b", "hardware": {"gpu": "h100", "n_gpus": 16}})
    m, hw = spec.model, spec.hardware
    # Two micro-batches per step: the first's (sharded) gradients are held at the second's peak.
    common = {"dp": 16, "global_batch": 32, "finetune": "lora", "lora_rank": 16}
    ddp = evaluate(m, hw, Strategy(zero_stage=0, **common)).memory
    fsdp = evaluate(m, hw, Strategy(zero_stage=3, **common)).memory
    adapters = lora_70b(16)
    assert ddp.params == pytest.approx(PARAMS_70B * 4 + adapters * 4)
    assert fsdp.params == pytest.approx((PARAMS_70B * 4 + adapters * 4) / 16)
    assert fsdp.grads == pytest.approx(adapters * 4 / 16)
    assert fsdp.optimizer == pytest.approx(adapters * 8 / 16)
    assert ddp.grads == pytest.approx(adapters * 4) and ddp.optimizer == pytest.approx(adapters * 8)
    # FSDP still gathers every block's (frozen) weights in bf16: the running one and the next,
    # with their adapters' unsharded gradients; Loom's root group (embedding, final norm,
    # head) stays gathered through the step; the loss backward's two fp32 logits-sized buffers.
    # Then 1 GB of context and 5 % fragmentation.
    block_bf16 = (PARAMS_70B - 2 * V70 * H70 - H70) / L70 * 2
    loss = m.seq_len * V70 * 4
    adapter_bf16 = adapters / L70 * 2
    root_bf16 = (2 * V70 * H70 + H70) * 2
    tensors = fsdp.params + fsdp.grads + fsdp.optimizer + fsdp.activations
    expected = 1e9 + 2 * (block_bf16 + adapter_bf16) + root_bf16 + 2 * loss + 0.05 * tensors
    assert fsdp.other == pytest.approx(expected)
    # Full training, one micro-batch: no gradient exists during backward (the optimizer set
    # them to None, FSDP reduce-scatters each block's as it finishes). Two moments compete: the
    # loss's backward (every activation, the root group gathered, the saved log-softmax and two
    # fp32 logits-sized buffers of the fused cross-entropy backward) and the last block's (the
    # log-softmax freed, the root group with its gradients, two blocks with theirs).
    full_strategy = Strategy(zero_stage=3, dp=16, global_batch=16)
    full = evaluate(m, hw, full_strategy).memory
    assert full.grads == 0
    acts = planner_activations(m, full_strategy)
    states = full.params + full.optimizer
    at_loss = states + acts + 1e9 + root_bf16 + 2 * loss + 0.05 * (states + acts)
    held = acts - loss  # no recomputation: the block has its activations already
    at_block = states + held + 1e9 + 2 * root_bf16 + 4 * block_bf16 + 0.05 * (states + held)
    assert full.total == pytest.approx(max(at_loss, at_block))


def test_qlora_stores_the_projections_in_nf4_and_the_rest_as_it_was() -> None:
    """QLoRA quantizes the adapted linears (every projection of every block); the embedding,
    the head and the norms stay fp32 in Loom, bf16 in a Megatron-style framework."""
    spec = parse_spec({"model": "llama3-70b", "hardware": {"gpu": "h100", "n_gpus": 1}})
    m, hw = spec.model, spec.hardware
    projections = L70 * (2 * H70 * H70 + 2 * H70 * KV70 + 3 * H70 * F70)
    dense = PARAMS_70B - projections
    assert dense == NORMS_70B + 2 * V70 * H70
    adapters = lora_70b(16)
    for framework, dense_bytes, adapter_bytes in (("loom", 4, 4), ("megatron", 2, 2)):
        s = Strategy(finetune="qlora", lora_rank=16, framework=framework)
        memory = evaluate(m, hw, s).memory
        expected = projections * NF4 + dense * dense_bytes + adapters * adapter_bytes
        assert memory.params == pytest.approx(expected)
    with pytest.raises(LoomError, match="offload=none or use finetune=lora"):
        parse_spec(
            {
                "model": "llama3-70b",
                "hardware": {"gpu": "h100", "n_gpus": 1},
                "strategy": {"finetune": "qlora", "offload": "params"},
            }
        )


def test_70b_lora_tp4_fsdp16_on_64_h100_is_megatron_style_not_loom() -> None:
    raw = {
        "model": {"preset": "llama3-70b", "seq_len": 4096},
        "hardware": {"gpu": "h100", "n_gpus": 64},
        "strategy": {
            "tp": 4,
            "dp": 16,
            "sp": True,
            "zero_stage": 3,
            "recompute": "full",
            "micro_batch": 8,
            "global_batch": 256,
            "finetune": "lora",
            "lora_rank": 16,
        },
    }
    with pytest.raises(LoomError, match="data parallel only.*set tp=1"):  # loom finetune's rule
        parse_spec(raw)
    megatron = {**raw, "strategy": {**raw["strategy"], "framework": "megatron"}}
    best, _ = plan(parse_spec(megatron))
    # Tensor parallelism splits all but the norms; FSDP shards the rest of the bf16 base.
    base = ((PARAMS_70B - NORMS_70B) / 4 + NORMS_70B) * 2 / 16
    adapters = lora_70b(16) / 4
    assert best.memory.params == pytest.approx(base + adapters * 2 / 16)
    assert best.memory.params < 2.5e9  # not the 35 GB of an unsharded bf16 quarter
    assert best.fits and best.memory.total < 80e9
    full, _ = plan(
        parse_spec({**megatron, "strategy": {**megatron["strategy"], "finetune": "full"}})
    )
    assert best.memory.total < full.memory.total  # same base, no full gradients or Adam state


def test_loom_lora_70b_on_fsdp_64_fits_as_train_checks_it() -> None:
    """The layout `loom finetune` runs for LoRA (tp 1, FSDP over all 64), through the path
    `loom train` / `loom run` take: the config and its resolved dims."""
    from dataclasses import replace

    from loom.core.config import Config
    from loom.core.presets import get_preset
    from loom.parallel.dims import ParallelDims
    from loom.planner.memory import fits
    from loom.planner.spec import gpu_hardware
    from loom.planner.training import predicted_memory

    base = Config()
    cfg = replace(
        base,
        model=get_preset("llama3-70b"),
        train=replace(base.train, seq_len=4096, batch_size=256, micro_batch_size=128),
        memory=replace(base.memory, recompute="full"),
    )
    dims = ParallelDims(pp=1, dp_replicate=1, dp_shard=64, tp=1, stages_per_rank=1, microbatches=1)
    hw = gpu_hardware("h100", 64)
    memory = predicted_memory(cfg, dims, hw, finetune="lora", lora_rank=16)
    assert memory.params == pytest.approx((PARAMS_70B * 4 + lora_70b(16) * 4) / 64)
    assert fits(memory, hw)


def test_hsdp_shards_within_its_group_as_loom_train_runs_it() -> None:
    """HSDP (`parallel.dp_replicate` × `dp_shard`) keeps 1/dp_shard of the states on each rank,
    not 1/dp: 2 replicas of 8-way shards hold twice what 16-way FSDP holds."""
    from dataclasses import replace

    from loom.core.config import Config
    from loom.core.presets import get_preset
    from loom.parallel.dims import ParallelDims
    from loom.planner.spec import gpu_hardware
    from loom.planner.training import predicted_memory

    spec = parse_spec({"model": "llama3-70b", "hardware": {"gpu": "h100", "n_gpus": 16}})
    m, hw = spec.model, spec.hardware
    fsdp = evaluate(m, hw, Strategy(dp=16, zero_stage=3, global_batch=16)).memory
    hsdp = evaluate(m, hw, Strategy(dp=16, dp_shard=8, zero_stage=3, global_batch=16)).memory
    assert fsdp.params == pytest.approx(PARAMS_70B * 4 / 16)
    assert hsdp.params == pytest.approx(PARAMS_70B * 4 / 8)
    assert hsdp.optimizer == pytest.approx(PARAMS_70B * 8 / 8)
    base = Config()
    cfg = replace(
        base,
        model=get_preset("llama3-70b"),
        train=replace(base.train, seq_len=m.seq_len, batch_size=16, micro_batch_size=16),
    )
    dims = ParallelDims(pp=1, dp_replicate=2, dp_shard=8, tp=1, stages_per_rank=1, microbatches=1)
    trained = predicted_memory(cfg, dims, gpu_hardware("h100", 16))
    assert trained.params == pytest.approx(PARAMS_70B * 4 / 8)


def test_lora_gathers_every_weight_but_reduces_only_adapter_gradients() -> None:
    """ZeRO-3 all-gathers the frozen base layer by layer, forward and backward, for every
    micro-batch; the gradient reduce-scatter moves the adapters' gradients only."""
    from loom.planner.cost import Calibration, step_time

    spec = parse_spec({"model": "llama3-70b", "hardware": {"gpu": "h100", "n_gpus": 16}})
    m, hw = spec.model, spec.hardware
    cal = Calibration(dp_overlap=0.0, collective_latency_s=0.0, hop_latency_s=0.0)
    # 16 ranks span two nodes, 8 in each: the ring runs over 8 network cards at once.
    link = min(hw.intra_node_gbps, 8 * hw.inter_node_gbps) * 1e9 * cal.link_efficiency
    dp, micro = 16, 2
    common = {"dp": dp, "zero_stage": 3, "global_batch": dp * micro, "recompute": "full"}
    full = step_time(m, hw, Strategy(**common), cal)
    lora = step_time(m, hw, Strategy(finetune="lora", **common), cal)
    per_layer = (dp - 1) / dp * PARAMS_70B * 2 / m.layers / link  # bf16
    # Forward and backward for every micro-batch, and the first layer's, which nothing hides.
    gather = (2 * micro * m.layers + 1) * per_layer
    assert lora.data_parallel > gather > 0
    reduce_full, reduce_lora = full.data_parallel - gather, lora.data_parallel - gather
    # ZeRO-3 reduce-scatters fp32 gradients: each rank sends (dp − 1)/dp of them once.
    assert reduce_full == pytest.approx((dp - 1) / dp * PARAMS_70B * 4 / link)
    assert reduce_full / reduce_lora == pytest.approx(PARAMS_70B / lora_70b(16))


def test_lora_backward_skips_the_frozen_weights_gradients() -> None:
    """A frozen weight's backward computes the input gradient only: one matmul pass instead of
    two per block and for the output projection; the rank-16 adapters train in full. QLoRA
    also dequantizes every NF4 projection (read 4 bits + scales, write bf16) forward and
    backward. Shape effects off (half_size 0) so each matmul costs its FLOPs at one rate."""
    from loom.planner.cost import Calibration, step_time

    spec = parse_spec({"model": "llama3-70b", "hardware": {"gpu": "h100", "n_gpus": 1}})
    m, hw = spec.model, spec.hardware
    cal = Calibration(half_size=0.0)
    rate = hw.peak_tflops["bf16"] * 1e12 * cal.matmul_efficiency
    tokens = m.seq_len  # one sequence per step
    common = {"micro_batch": 1, "global_batch": 1, "recompute": "none", "lora_rank": 16}
    full, lora, qlora = (
        step_time(m, hw, Strategy(finetune=kind, **common), cal)
        for kind in ("full", "lora", "qlora")
    )
    block = 2 * H70 * H70 + 2 * H70 * KV70 + 3 * H70 * F70
    weight_grads = 2 * tokens * (L70 * block + V70 * H70) / rate
    adapters = 3 * 2 * tokens * lora_70b(16) / rate
    assert full.compute - lora.compute == pytest.approx(weight_grads - adapters)
    dequantize = 2 * L70 * block * (NF4 + 2) / (hw.hbm_gbps * 1e9)
    assert qlora.compute - lora.compute == pytest.approx(dequantize)
    # The skipped weight-gradient matmuls are a third of full training's matmuls; attention and
    # elementwise work are the same in both.
    assert 2 / 3 < lora.compute / full.compute < 0.85
    attention = 12 * L70 * H70 * m.seq_len
    matmul = L70 * block + V70 * H70
    assert full.model_flops == pytest.approx(tokens * (6 * matmul + attention))
    assert lora.model_flops == pytest.approx(tokens * (4 * matmul + attention + 6 * lora_70b(16)))


def test_pipeline_bubbles_by_schedule() -> None:
    """1F1B idles pp − 1 micro-batch times per step; interleaving over v chunks divides that
    by v; a zero-bubble schedule keeps a third of it (ZB-H1) with at least pp micro-batches,
    two thirds with fewer."""
    from loom.planner.cost import step_time

    spec = parse_spec({"model": "llama3-8b", "hardware": {"gpu": "h100", "n_gpus": 8}})
    m, hw = spec.model, spec.hardware
    common = {"pp": 8, "global_batch": 16}
    bubble = {
        name: step_time(m, hw, Strategy(schedule=name, virtual_stages=v, **common)).bubble
        for name, v in (("1F1B", 1), ("Interleaved1F1B", 2), ("ZeroBubble", 1))
    }
    assert bubble["1F1B"] > 0
    assert bubble["Interleaved1F1B"] == pytest.approx(bubble["1F1B"] / 2)
    assert bubble["ZeroBubble"] == pytest.approx(bubble["1F1B"] / 3)
    one = step_time(m, hw, Strategy(schedule="ZeroBubble", pp=8, global_batch=1))
    assert one.bubble == pytest.approx(2 * bubble["ZeroBubble"])  # 1 micro-batch, 8 stages


def test_memory_terms_follow_sharding() -> None:
    spec = parse_spec({"model": "llama3-8b", "hardware": {"gpu": "h100", "n_gpus": 8}})
    m, hw = spec.model, spec.hardware
    ddp = evaluate(m, hw, Strategy(dp=8, global_batch=8)).memory
    fsdp = evaluate(m, hw, Strategy(dp=8, zero_stage=3, global_batch=8)).memory
    assert fsdp.params == pytest.approx(ddp.params / 8)
    assert fsdp.optimizer == pytest.approx(ddp.optimizer / 8)
    assert ddp.params == pytest.approx(m.params() * 4)  # fp32 weights, Loom style
    full = evaluate(m, hw, Strategy(dp=8, recompute="full", global_batch=8)).memory
    selective = evaluate(m, hw, Strategy(dp=8, recompute="selective", global_batch=8)).memory
    assert full.activations < selective.activations < ddp.activations
    offloaded = evaluate(m, hw, Strategy(dp=8, offload="optimizer", global_batch=8)).memory
    # Adam's two fp32 moments and the fp32 master move to host: 12 bytes per parameter.
    assert offloaded.optimizer == 0 and offloaded.host == pytest.approx(m.params() * 12)


@pytest.mark.parametrize(
    "raw,message",
    [
        ({"model": "llama3-8b"}, "lacks 'hardware'"),
        ({"model": "llama3-8b", "hardware": {"gpu": "tpu-v9", "n_gpus": 8}}, "not in the table"),
        ({"model": {"layers": 2}, "hardware": {"gpu": "h100", "n_gpus": 8}}, "lacks hidden, heads"),
        (
            {
                "model": "llama3-8b",
                "hardware": {"gpu": "h100", "n_gpus": 8},
                "strategy": {"tp": 2, "pp": 2, "dp": 4},
            },
            "= 16, but hardware.n_gpus = 8",
        ),
        (
            {"model": "llama3-8b", "hardware": {"gpu": "h100", "n_gpus": 8}, "strategy": {"tp": 3}},
            "does not divide 8 devices",
        ),
        (
            {"model": "llama3-8b", "hardware": {"gpu": "h100", "n_gpus": 6}, "strategy": {"tp": 3}},
            "must divide the 32 attention heads",
        ),
        ({"model": "gpt5", "hardware": {"gpu": "h100", "n_gpus": 8}}, "is not a preset"),
        ({"model": "llama3-8b", "hardware": {"peak_tflops": 100, "n_gpus": 8}}, "gpu_mem_gb"),
    ],
)
def test_bad_specs_say_what_to_fix(raw: dict[str, object], message: str) -> None:
    with pytest.raises(LoomError) as info:
        _best, _ = plan(parse_spec(raw))
    assert message in str(info.value)


def test_model_that_fits_nowhere_names_the_device_count() -> None:
    spec = parse_spec({"model": "llama3-405b", "hardware": {"gpu": "a100", "n_gpus": 8}})
    with pytest.raises(LoomError, match=r"needs ≥ (16|32|64|128) of these devices"):
        plan(spec)


def test_cli_json_contract(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "model": {"preset": "llama3-8b", "seq_len": 4096},
                "hardware": {"gpu": "h100", "n_gpus": 64},
                "training": {"tokens": 1e12},
            }
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "loom.cli", "plan", "--spec", str(spec), "--json"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert set(out["memory_gib"]) == {
        "params",
        "grads",
        "optimizer",
        "activations",
        "other",
        "total",
    }
    for key in ("step_time_s", "tflops_per_gpu", "mfu", "tokens_per_s", "train_days", "best"):
        assert key in out
    assert out["candidates"][0] == out["best"] and len(out["candidates"]) > 1
    assert out["tokens_per_s"] == pytest.approx(
        out["strategy"]["global_batch"] * 4096 / out["step_time_s"]
    )
    assert out["train_days"] == pytest.approx(1e12 / out["tokens_per_s"] / 86400)


def test_cli_refuses_an_unknown_gpu_in_one_line() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loom.cli",
            "plan",
            "--model",
            "llama3-8b",
            "--gpu",
            "x9",
            "--gpus",
            "8",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: hardware.gpu='x9' is not in the table")


def test_training_refuses_a_model_predicted_not_to_fit(data_dir: Path, tmp_path: Path) -> None:
    from loom.core.config import load_config
    from loom.train.trainer import Trainer

    args = [f"--data.path={data_dir}", f"--run_dir={tmp_path / 'run'}", "--train.seq_len=128"]
    cfg = load_config(None, [*args, "--model.preset=llama3-70b"])
    with pytest.raises(LoomError, match=r"predicted to need \d+\.\d GiB per device .* train.force"):
        Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_parallel_auto_picks_a_layout_loom_can_run(tiny_config: object) -> None:
    from loom.parallel.dims import resolve
    from loom.planner.training import auto_layout

    cfg = tiny_config("--model.n_layers=4", "--parallel.auto=true", "--train.batch_size=8")
    chosen = auto_layout(cfg, 4, torch.device("cpu"))
    dims = resolve(chosen, 4)
    assert dims.world_size == 4 and chosen.parallel.auto is False


SHAPES = {  # not the shape the Llama coefficients were measured at (dim 512, GQA 8/4, ffn 2.75h)
    "mha-ffn4h-seq512": dict(dim=256, n_heads=4, n_kv_heads=4, ffn_hidden=1024, seq=512, batch=2),
    "gqa4-seq128": dict(dim=384, n_heads=12, n_kv_heads=3, ffn_hidden=1024, seq=128, batch=8),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predicted_activations_within_15_percent_of_measured(
    shape: str, recompute: str, precision: str
) -> None:
    from loom.models.llama import ModelConfig
    from loom.planner.calibrate import measure_activations
    from loom.planner.memory import activations
    from loom.planner.spec import model_from_config

    dims = dict(SHAPES[shape])
    seq, batch = dims.pop("seq"), dims.pop("batch")
    cfg = ModelConfig(vocab_size=4096, n_layers=4, max_seq_len=seq, **dims)
    measured = measure_activations(cfg, batch, seq, recompute, precision)
    strategy = Strategy(micro_batch=batch, recompute=recompute, precision=precision)
    predicted = activations(model_from_config(cfg, seq), strategy)
    assert abs(predicted / measured - 1) <= 0.15, (predicted, measured)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("h100", "h100"),
        ("h100-80gb", "h100"),
        ("h100-sxm", "h100"),
        ("NVIDIA H100 80GB HBM3", "h100"),  # torch.cuda.get_device_name()
        ("h100-pcie", "h100-pcie"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("a100-sxm4-80gb", "a100"),
    ],
)
def test_gpu_names_as_people_and_drivers_write_them(name: str, key: str) -> None:
    assert _gpu_key(name) == key


def test_spec_keys_for_kernels_and_power_change_the_answer() -> None:
    """hardware.power_limit_w and hbm_gbps, strategy.compile and flash_attention each move the
    predicted step the way the hardware would."""
    base = {"model": "llama3-8b", "hardware": {"gpu": "h100", "n_gpus": 8}}
    layout = {"zero_stage": 3, "micro_batch": 1, "global_batch": 8, "recompute": "full"}

    def step(hardware: dict[str, object], **strategy: object) -> float:
        spec = parse_spec(
            {
                **base,
                "hardware": {**base["hardware"], **hardware},
                "strategy": {**layout, **strategy},
            }
        )
        assert spec.strategy is not None
        return evaluate(spec.model, spec.hardware, spec.strategy).time.total

    plain = step({})
    assert step({"power_limit_w": 500}) > plain  # capped below the 700 W TDP: lower clocks
    assert step({"power_limit_w": 700}) == pytest.approx(plain)  # at TDP: no change
    assert step({"hbm_gbps": 1000}) > plain  # elementwise work is memory-bound
    assert step({}, compile=True) < plain  # fused elementwise kernels
    assert step({}, flash_attention=False) > plain  # attention over the full square, unfused
