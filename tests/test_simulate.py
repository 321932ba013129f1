"""`loom train --simulate`: one rank of a large job on fake tensors, against the planner.

Each simulation runs Loom's real model, layout and training step, so these tests catch
layout bugs that only show at scale (a parameter left whole, a collective on the wrong mesh
dimension) on a machine without GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loom.core.config import Config, load_config
from loom.core.errors import LoomError
from loom.models.llama import build_model
from loom.planner.spec import ModelShape, Strategy
from loom.train.simulate import (
    SimulationResult,
    config_for_plan,
    planner_prediction,
    schedule_order,
    simulate,
)

REPO = Path(__file__).resolve().parents[1]
LOOM_TRAIN_TINY = [sys.executable, "-m", "loom", "train", str(REPO / "configs" / "tiny.toml")]
TINY = [
    "--model.preset=tiny",
    "--model.tie_embeddings=false",
    "--train.seq_len=128",
    "--train.batch_size=16",
    "--train.micro_batch_size=8",
    "--train.precision=bf16",
    "--train.device=cpu",
]


def tiny(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])


def shard_bytes(cfg: Config, tp: int, dp_shard: int) -> float:
    """fp32 bytes of one rank's shards: tensor parallelism splits all but the norm weights
    (copied), FSDP splits everything over its ranks."""
    with torch.device("meta"):
        named = list(build_model(cfg.model).named_parameters())
    norms = sum(p.numel() for name, p in named if "norm" in name)
    total = sum(p.numel() for _, p in named)
    return 4 * ((total - norms) / tp + norms) / dp_shard


def keyed(result: SimulationResult) -> dict[tuple[str, str], tuple[int, float]]:
    return {(c.kind, c.group): (c.count, c.bytes) for c in result.collectives}


def check_against_planner(cfg: Config, world: int, result: SimulationResult) -> None:
    """Every collective the planner predicts happens, as often and moving the same bytes
    (within 10%); the ones it leaves out are scalars; the model states agree."""
    memory, predicted = planner_prediction(cfg, world)
    simulated = keyed(result)
    for c in predicted:
        count, volume = simulated.pop((c.kind, c.group))
        assert count == c.count, (c, count)
        assert abs(volume - c.bytes) <= 0.10 * volume, (c, volume)
    assert sum(volume for _, volume in simulated.values()) < 1e-3 * sum(
        c.bytes for c in predicted
    ), simulated
    for key in ("params", "optimizer"):
        assert memory[key] == pytest.approx(result.memory_gib[key], rel=0.10), key


def test_tp_and_fsdp_on_8_ranks_shard_every_parameter() -> None:
    cfg = tiny("--parallel.tp=2", "--parallel.dp_shard=4")
    result = simulate(cfg, 8)
    assert result.layout["tp"] == 2 and result.layout["dp_shard"] == 4
    assert result.unsharded_params == []
    assert result.param_bytes == shard_bytes(cfg, tp=2, dp_shard=4)
    assert set(keyed(result)) >= {
        ("all_gather", "dp_shard"),
        ("reduce_scatter", "dp_shard"),
        ("all_gather", "tp"),
        ("reduce_scatter", "tp"),
    }
    assert not any(c.group in ("dp_replicate", "pp", "world") for c in result.collectives)
    check_against_planner(cfg, 8, result)


def test_70b_widths_on_1024_ranks_hsdp_with_tp() -> None:
    """The 70B preset's real widths (two of its 80 blocks, to keep the test short) on 1,024
    ranks: 4 replicas × 32 shards × tp 8, full recomputation. With so few activations the
    peak is the end of backward (the vocabulary-parallel embedding's gradient), which the
    planner predicts within 10%."""
    args = [
        "--model.preset=llama3-70b",
        "--model.n_layers=2",
        "--train.seq_len=2048",
        "--train.precision=bf16",
        "--train.device=cpu",
        "--train.batch_size=128",
        "--train.micro_batch_size=128",
        "--parallel.dp_replicate=4",
        "--parallel.tp=8",
        "--memory.recompute=full",
    ]
    cfg = load_config(None, args)
    result = simulate(cfg, 1024, rank=1023)
    assert result.layout["dp_shard"] == 32
    assert result.layout["coordinates"] == {"pp": 0, "dp_replicate": 3, "dp_shard": 31, "tp": 7}
    assert result.unsharded_params == []
    # FSDP pads dimensions that do not split evenly: within 1%.
    assert result.param_bytes == pytest.approx(shard_bytes(cfg, tp=8, dp_shard=32), rel=0.01)
    assert ("all_reduce", "dp_replicate") in keyed(result)  # HSDP: across the replicas
    check_against_planner(cfg, 1024, result)
    memory, _ = planner_prediction(cfg, 1024)
    assert memory["activations"] == 0.0  # the planner's peak is the end of backward too
    assert memory["total"] == pytest.approx(result.memory_gib["total"], rel=0.10)


@pytest.mark.slow
def test_fsdp_pads_tensors_with_fewer_rows_than_ranks_and_the_planner_knows() -> None:
    """tp 8 × dp_shard 512 of 8B widths: each K/V projection keeps 128 rows per tp rank, fewer
    than the 512 FSDP ranks, and the MLP's 1,792 do not divide by 512: FSDP pads every rank's
    shard (7% here, 19% of a block). The planner's state bytes and FSDP traffic include it."""
    args = [
        "--model.preset=llama3-8b",
        "--model.n_layers=2",
        "--train.seq_len=1024",
        "--train.precision=bf16",
        "--train.device=cpu",
        "--train.batch_size=512",
        "--train.micro_batch_size=512",
        "--parallel.tp=8",
        "--memory.recompute=full",
    ]
    cfg = load_config(None, args)
    result = simulate(cfg, 4096)
    assert result.param_bytes > 1.05 * shard_bytes(cfg, tp=8, dp_shard=512)
    check_against_planner(cfg, 4096, result)
    memory, _ = planner_prediction(cfg, 4096)
    assert memory["params"] == pytest.approx(result.param_bytes / 2**30, rel=0.01)


def test_tp_fsdp_without_recompute_peaks_in_the_loss_backward() -> None:
    """8B widths, tp 2 × FSDP 4, no recomputation: the peak is the loss's backward (every
    activation kept, loss-parallel's fp32 vocabulary-shard buffers), which the planner costs as
    one of its three backward moments: within 10% of the real code."""
    args = [
        "--model.preset=llama3-8b",
        "--model.n_layers=2",
        "--train.seq_len=4096",
        "--train.precision=bf16",
        "--train.device=cpu",
        "--train.batch_size=4",
        "--train.micro_batch_size=4",
        "--parallel.tp=2",
    ]
    cfg = load_config(None, args)
    result = simulate(cfg, 8)
    memory, _ = planner_prediction(cfg, 8)
    assert result.memory_gib["activations"] > 0 and memory["activations"] > 0
    assert memory["total"] == pytest.approx(result.memory_gib["total"], rel=0.10)


def test_pure_tensor_parallel_leaves_the_norms_whole() -> None:
    """Without FSDP, tensor parallelism copies the norm weights to every rank: the check that
    finds parameters left whole names exactly those."""
    result = simulate(tiny("--parallel.tp=2", "--parallel.dp_shard=1"), 2)
    assert result.unsharded_params
    assert all("norm" in name for name in result.unsharded_params)


def test_one_rank_with_tied_embeddings_simulates_the_whole_model() -> None:
    """One rank holds plain (not DTensor) parameters, which `to_empty` could not swap under the
    fake mode ("Couldn't swap Embedding.weight"); the tied embedding stays one parameter."""
    cfg = load_config(REPO / "configs" / "tiny.toml", ["--train.device=cpu"])
    assert cfg.model.tie_embeddings
    result = simulate(cfg, 1)
    assert result.collectives == []
    assert result.param_bytes == shard_bytes(cfg, tp=1, dp_shard=1)
    # AdamW: two fp32 moments per weight (and a step count per tensor)
    assert result.memory_gib["optimizer"] == pytest.approx(2 * result.param_bytes / 2**30, rel=1e-3)
    assert result.memory_gib["activations"] > 0


def test_a_layout_that_does_not_divide_is_refused_before_any_compute() -> None:
    with pytest.raises(LoomError, match="parallel.tp=8 must divide model.n_heads=8 and model.n_kv"):
        simulate(tiny("--parallel.tp=8"), 8)
    with pytest.raises(LoomError, match="--rank 8 is not a rank of 8"):
        simulate(tiny(), 8, rank=8)


@pytest.mark.slow
def test_cli_prints_json_that_compares_with_the_planner_key_by_key() -> None:
    proc = subprocess.run(
        [*LOOM_TRAIN_TINY, "--simulate", "8", "--rank", "3", "--json", "--parallel.dp_shard=8"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["world_size"] == 8 and out["rank"] == 3
    assert out["layout"]["coordinates"]["dp_shard"] == 3
    assert set(out["memory_gib"]) == {
        "params",
        "grads",
        "optimizer",
        "activations",
        "other",
        "total",
    }
    kinds = {(c["kind"], c["group"]) for c in out["collectives"]}
    assert {("all_gather", "dp_shard"), ("reduce_scatter", "dp_shard")} <= kinds
    bad = subprocess.run(
        [*LOOM_TRAIN_TINY, "--simulate", "6", "--parallel.dp_shard=4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0
    assert bad.stderr.strip().splitlines()[-1].startswith("error: the layout needs")


def in_flight(order: list[tuple[str, int, int]]) -> int:
    """The most micro-batches forwarded and not yet backpropagated at once."""
    live, most = 0, 0
    for op, _, _ in order:
        live += 1 if op == "forward" else -1
        most = max(most, live)
    return most


def test_schedule_orders_keep_the_1f1b_and_gpipe_micro_batches_in_flight() -> None:
    for stage in range(4):
        order = schedule_order("1F1B", 4, stage, [stage], 8)
        assert in_flight(order) == 4 - stage
        assert sorted(order) == sorted(
            [(op, 0, mb) for op in ("forward", "backward") for mb in range(8)]
        )
    assert in_flight(schedule_order("1F1B", 4, 1, [1], 2)) == 2
    assert in_flight(schedule_order("GPipe", 4, 3, [3], 8)) == 8
    # Interleaved, rank 0 of 2 with stages 0 and 2: torch's warm-up, 2·1 + 2·1 + 1 forwards.
    order = schedule_order("Interleaved1F1B", 2, 0, [0, 2], 4)
    assert [op for op, _, _ in order[:6]] == ["forward"] * 5 + ["backward"]
    assert order[5] == ("backward", 1, 0)  # the last chunk's first micro-batch comes back first


PIPELINE = ("--parallel.pp=2", "--parallel.dp_shard=2", "--parallel.tp=2")


@pytest.mark.slow
def test_1f1b_pipeline_on_8_ranks_first_and_last_stage() -> None:
    """pp 2 × FSDP 2 × tp 2 on 8 ranks, 2 accumulation steps of 2 pipeline micro-batches: rank
    3 holds the first stage (the planner's rank), rank 7 the last; each sends one activation
    and receives one gradient per micro-batch (or the reverse), sequence-sharded by tp."""
    cfg = tiny(*PIPELINE)
    first = simulate(cfg, 8, rank=3)
    assert first.layout["coordinates"] == {"pp": 0, "dp_replicate": 0, "dp_shard": 1, "tp": 1}
    assert first.unsharded_params == []
    check_against_planner(cfg, 8, first)
    last = simulate(cfg, 8, rank=7)
    assert last.layout["coordinates"]["pp"] == 1 and last.unsharded_params == []
    # 4 sequences per rank split in 2, 128 / tp tokens of the bf16 residual stream
    message = 2 * (128 // 2) * cfg.model.dim * 2
    for result in (first, last):
        assert keyed(result)[("send", "pp")] == (4, 4 * message)
        assert keyed(result)[("recv", "pp")] == (4, 4 * message)
    # The last stage holds the head and keeps its logits for backward: more activations.
    assert last.param_bytes > first.param_bytes
    assert last.memory_gib["activations"] > first.memory_gib["activations"]


def test_interleaved_pipeline_on_8_ranks_against_the_planner() -> None:
    cfg = tiny(*PIPELINE, "--parallel.schedule=Interleaved1F1B", "--train.micro_batch_size=16")
    result = simulate(cfg, 8, rank=0)
    assert result.layout["stages_per_rank"] == 2 and result.layout["microbatches"] == 4
    assert keyed(result)[("send", "pp")][0] == 4 * 3  # stage 0 sends 1, stage 2 sends 2
    check_against_planner(cfg, 8, result)


@pytest.mark.slow
def test_loom_plan_simulate_runs_the_planners_layout_and_prints_both(tmp_path: Path) -> None:
    """`loom plan --simulate --json`: the planner's layout built as a Loom config (pp 2 × tp 2
    × FSDP 2 here), simulated on rank 6 (the last stage), both sides in one JSON object."""
    spec = {
        "model": {
            "layers": 4,
            "hidden": 256,
            "heads": 4,
            "kv_heads": 4,
            "ffn_hidden": 768,
            "vocab": 8192,
            "seq_len": 128,
        },
        "hardware": {"gpu": "h100", "n_gpus": 8},
        "training": {"global_batch_tokens": 4096},
        "strategy": {"tp": 2, "pp": 2, "dp": 2, "zero_stage": 3, "micro_batch": 2, "sp": True},
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "loom", "plan", "--spec", str(path), "--simulate"]
    proc = subprocess.run(
        [*command, "--json", "--rank", "6"], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["simulated_layout"] == "tp2 pp2 dp2 mb2 zero3 1F1B"
    simulated = out["simulated"]
    assert simulated["world_size"] == 8
    assert simulated["layout"]["coordinates"] == {
        "pp": 1,
        "dp_replicate": 0,
        "dp_shard": 1,
        "tp": 0,
    }
    assert simulated["layout"]["microbatches"] == 2  # 16 sequences: 2 steps of 2 × 2 × 2
    planned = {(c["kind"], c["group"]): c["count"] for c in out["planner"]["collectives"]}
    counted = {(c["kind"], c["group"]): c["count"] for c in simulated["collectives"]}
    assert planned == {k: v for k, v in counted.items() if k in planned}
    assert set(out["planner"]["memory_gib"]) == set(simulated["memory_gib"])


@pytest.mark.slow
def test_context_parallel_layout_against_the_planner() -> None:
    """cp 4 × FSDP 2 (FSDP over the flattened dp_shard × cp ranks), selective recomputation:
    the planner's memory within 10% (the ring's score tiles are recomputed, not kept) and its
    collectives call for call, the ring attention's K/V hops over cp included."""
    args = [
        "--model.preset=llama3-8b",
        "--model.n_layers=2",
        "--model.max_seq_len=16384",
        "--train.seq_len=16384",
        "--train.precision=bf16",
        "--train.device=cpu",
        "--train.batch_size=2",
        "--parallel.cp=4",
        "--parallel.dp_shard=2",
        "--memory.recompute=selective",
    ]
    cfg = load_config(None, args)
    result = simulate(cfg, 8, rank=5)
    assert result.layout["cp"] == 4
    assert result.layout["coordinates"] == {
        "pp": 0,
        "dp_replicate": 0,
        "dp_shard": 1,
        "cp": 1,
        "tp": 0,
    }
    assert result.unsharded_params == []
    assert result.param_bytes == pytest.approx(shard_bytes(cfg, tp=1, dp_shard=8), rel=0.01)
    check_against_planner(cfg, 8, result)
    assert {("all_to_all", "cp"), ("reduce_scatter", "dp_shard_cp")} <= set(keyed(result))
    memory, _ = planner_prediction(cfg, 8)
    assert memory["total"] == pytest.approx(result.memory_gib["total"], rel=0.10)
    assert memory["activations"] == pytest.approx(result.memory_gib["activations"], rel=0.10)


@pytest.mark.slow
def test_context_parallel_with_tensor_and_pipeline_parallel_against_the_planner() -> None:
    """pp 2 × cp 2 × tp 2 (sequence parallel) × FSDP 2 at 16K tokens, a middle rank: the
    pipeline's stages get this rank's share of the sequence, the ring's hops and the tp
    collectives are the planner's call for call, memory within 10%."""
    args = [
        "--model.preset=llama3-8b",
        "--model.n_layers=4",
        "--model.max_seq_len=16384",
        "--train.seq_len=16384",
        "--train.precision=bf16",
        "--train.device=cpu",
        "--train.batch_size=4",
        "--parallel.pp=2",
        "--parallel.cp=2",
        "--parallel.tp=2",
        "--parallel.dp_shard=2",
        "--parallel.sequence_parallel=true",
        "--memory.recompute=full",
    ]
    cfg = load_config(None, args)
    result = simulate(cfg, 16, rank=6)
    assert result.layout["coordinates"] == {
        "pp": 0,
        "dp_replicate": 0,
        "dp_shard": 1,
        "cp": 1,
        "tp": 0,
    }
    check_against_planner(cfg, 16, result)
    assert {("all_to_all", "cp"), ("send", "pp"), ("all_gather", "tp")} <= set(keyed(result))
    memory, _ = planner_prediction(cfg, 16)
    assert memory["total"] == pytest.approx(result.memory_gib["total"], rel=0.10)


def test_plan_layouts_loom_cannot_run_are_refused_by_name() -> None:
    model = ModelShape(4, 256, 4, 4, 768, 8192, 128)
    split = config_for_plan(model, Strategy(tp=2, cp=2, dp=2, zero_stage=3, global_batch=8))
    assert (split.parallel.cp, split.parallel.tp, split.parallel.dp_shard) == (2, 2, 2)
    with pytest.raises(LoomError, match="strategy.framework=megatron cannot be simulated"):
        config_for_plan(model, Strategy(dp=8, framework="megatron", global_batch=8))
    cfg = config_for_plan(model, Strategy(tp=2, pp=2, dp=2, zero_stage=3, global_batch=16))
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.dp_shard) == (2, 2, 2)
    assert cfg.train.micro_batch_size == 1 * 2 * 2  # per rank × dp × pipeline micro-batches


def test_mixture_of_experts_with_tp_and_ep_against_the_planner() -> None:
    """Mixtral widths, tp 2 (sequence parallel) × ep 4 over FSDP 4, routed as if balanced
    (fake tensors cannot know the busiest expert): the experts' all-to-alls, FSDP without the
    held experts and the MoE blocks' tp collectives are the planner's call for call, memory
    within 10%."""
    args = [
        "--model.preset=mixtral-8x7b",
        "--model.n_layers=2",
        "--model.tie_embeddings=false",
        "--train.seq_len=2048",
        "--train.precision=bf16",
        "--train.device=cpu",
        "--train.batch_size=4",
        "--parallel.tp=2",
        "--parallel.ep=4",
        "--memory.recompute=full",
    ]
    cfg = load_config(None, args)
    result = simulate(cfg, 8)
    check_against_planner(cfg, 8, result)
    assert ("all_to_all", "dp_shard") in set(keyed(result))
    memory, _ = planner_prediction(cfg, 8)
    assert memory["total"] == pytest.approx(result.memory_gib["total"], rel=0.10)
