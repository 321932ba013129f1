"""Parallel layouts against the single-process run: real torchrun launches with gloo on CPU.

Three launches (2, 4 and 8 processes) run every layout one after another through the real
Trainer (tests/run_layouts.py). Each layout must log the same per-step losses as a
single process from the same seed and data (1e-5) and end with the same parameters (1e-4);
checkpoints saved under one layout must resume under another with the same next-step loss.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_MODEL
from run_layouts import launch, roll_back

from loom.core.checkpoint import load_model_weights
from loom.core.config import Config, load_config
from loom.core.errors import LoomError
from loom.models.llama import build_model
from loom.parallel.dims import resolve
from loom.train.trainer import Trainer

SCHEDULES = [
    "GPipe",
    "1F1B",
    "Interleaved1F1B",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
    "DualPipeV",
]
STEPS = 6


def base_args(data_dir: Path) -> list[str]:
    return [
        *TINY_MODEL,
        "--model.n_layers=4",  # 4 stages for the interleaved and V schedules at pp=2
        "--model.tie_embeddings=false",
        f"--data.path={data_dir}",
        f"--train.steps={STEPS}",
        "--train.batch_size=8",
        "--train.micro_batch_size=4",  # two accumulation steps per optimizer step
        "--train.seq_len=32",
        "--train.eval_interval=0",
        "--train.eval_batches=2",
        "--optimizer.warmup_steps=2",
        "--metrics.log_interval=1",
        "--metrics.progress=plain",
        "--metrics.tensorboard=false",
        "--checkpoint.interval=5",
        "--checkpoint.keep=3",
    ]


# name -> overrides; world size 2, 4 and 8.
LAYOUTS: dict[int, dict[str, list[str]]] = {
    2: {
        "ddp2": ["--parallel.dp_replicate=2", "--parallel.dp_shard=1"],
        "fsdp2": [],
        "fsdp2_bf16": ["--train.precision=bf16"],
        "fsdp2_offload_params": ["--memory.offload=params"],
        "fsdp2_recompute_full": ["--memory.recompute=full"],
        "fsdp2_recompute_selective": ["--memory.recompute=selective"],
        "fsdp2_recompute_every2": ["--memory.recompute=full", "--memory.recompute_every=2"],
        "fsdp2_activation_offload": [
            "--memory.activation_offload=true",
            "--memory.recompute=selective",
        ],
        "fsdp2_float8": ["--train.float8=true"],
        "fsdp2_compile": ["--train.compile=true"],
        "tp2": ["--parallel.tp=2", "--parallel.dp_shard=1"],
        **{
            f"pp2_{s}": ["--parallel.pp=2", "--parallel.dp_shard=1", f"--parallel.schedule={s}"]
            for s in SCHEDULES
        },
        "pp2_split": ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.split_points=1"],
    },
    4: {
        "fsdp4": [],
        "hsdp2x2": ["--parallel.dp_replicate=2"],
        "fsdp2_tp2": ["--parallel.tp=2"],
        "pp2_fsdp2": ["--parallel.pp=2"],
    },
    8: {
        "pp2_fsdp2_tp2": ["--parallel.pp=2", "--parallel.tp=2"],
        "pp2_cp2_tp2": ["--parallel.pp=2", "--parallel.cp=2", "--parallel.tp=2"],
    },
}
# name -> (world size, overrides, run it resumes at step 5)
RESUMES: dict[str, tuple[int, list[str], str]] = {
    "single_to_fsdp2": (2, [], "single"),
    "fsdp4_to_fsdp2_tp2": (4, ["--parallel.tp=2"], "fsdp4"),
    "fsdp4_to_pp2_fsdp2": (4, ["--parallel.pp=2"], "fsdp4"),
}
APPROXIMATE = {"fsdp2_bf16", "fsdp2_float8"}  # different arithmetic: compared loosely


@pytest.fixture(scope="module")
def runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Single-process reference, then every layout; returns each run's rank records."""
    root = tmp_path_factory.mktemp("layouts")
    args = base_args(data_dir)
    single = Trainer(load_config(None, [*args, f"--run_dir={root / 'single'}"])).run()
    results: dict[str, Any] = {"root": root, "single": single.train_losses}
    results["single_val"] = single.val_losses[STEPS]
    for world, layouts in LAYOUTS.items():
        spec = [
            {"name": name, "args": [*args, f"--run_dir={root / name}", *extra]}
            for name, extra in layouts.items()
        ]
        spec += [
            {
                "name": name,
                "args": [*args, f"--run_dir={root / name}", *extra],
                "resume_from": {"run_dir": str(root / source), "step": 5},
            }
            for name, (w, extra, source) in RESUMES.items()
            if w == world
        ]
        results.update(launch(world, spec, root))
    return results


def final_params(cfg: Config, run_dir: Path) -> dict[str, torch.Tensor]:
    model = build_model(cfg.model, "cpu")
    load_model_weights((run_dir / "checkpoints" / "latest").resolve(), model)
    return model.state_dict()


ALL = [name for layouts in LAYOUTS.values() for name in layouts]


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_layout_matches_single_process(runs: dict[str, Any], data_dir: Path, name: str) -> None:
    single = runs["single"]
    records = runs[name]
    losses = {int(k): v for k, v in records[0]["losses"].items()}
    assert sorted(losses) == list(range(1, STEPS + 1))
    # Every rank logs the same (averaged) loss.
    assert all(r["losses"] == records[0]["losses"] for r in records.values())
    cfg = load_config(None, base_args(data_dir))
    ref = final_params(cfg, runs["root"] / "single")
    got = final_params(cfg, runs["root"] / name)
    loss_diff = max(abs(losses[s] - single[s]) for s in single)
    param_diff = max((got[k] - ref[k]).abs().max().item() for k in ref)
    if name in APPROXIMATE:
        # bf16 / float8 compute: close to fp32, but really computed differently.
        assert 1e-6 < loss_diff < 2e-2 and param_diff < 5e-2
    else:
        assert loss_diff <= 1e-5, losses
        assert param_diff <= 1e-4
        # Validation at the last step runs through the same layout (forward only).
        assert records[0]["val_losses"][str(STEPS)] == pytest.approx(runs["single_val"], abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RESUMES))
def test_checkpoint_resumes_under_another_layout(runs: dict[str, Any], name: str) -> None:
    """Saved at step 5 under one layout, resumed under another: step 6 is the same step."""
    losses = {int(k): v for k, v in runs[name][0]["losses"].items()}
    assert list(losses) == [6]
    assert losses[6] == pytest.approx(runs["single"][6], abs=1e-6)


@pytest.mark.slow
def test_fsdp4_checkpoint_resumes_in_one_process(
    runs: dict[str, Any], data_dir: Path, tmp_path: Path
) -> None:
    roll_back(runs["root"] / "fsdp4", tmp_path / "resumed", 5)
    cfg = load_config(None, [*base_args(data_dir), f"--run_dir={tmp_path / 'resumed'}"])
    result = Trainer(cfg).run()
    assert list(result.train_losses) == [6]
    assert result.train_losses[6] == pytest.approx(runs["single"][6], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name,n", [("fsdp2", 2), ("fsdp4", 4)])
def test_fsdp_holds_one_nth_of_parameters_and_optimizer_state(
    runs: dict[str, Any], data_dir: Path, name: str, n: int
) -> None:
    cfg = load_config(None, base_args(data_dir))
    model = build_model(cfg.model)
    whole = sum(p.numel() * 4 for p in model.parameters())
    # Each tensor is split by rows; a rank's share is at most ceil(rows / n) rows.
    largest_share = sum(
        -(-p.shape[0] // n) * (p.numel() // p.shape[0]) * 4 for p in model.parameters()
    )
    per_rank = [runs[name][r]["bytes"] for r in range(n)]
    assert sum(b["params"] for b in per_rank) == whole
    assert sum(b["optimizer"] for b in per_rank) == 2 * whole  # Adam: two moments
    for b in per_rank:
        assert whole / n - (largest_share - whole / n) <= b["params"] <= largest_share
        assert b["optimizer"] == 2 * b["params"]
    # Replicated layouts hold everything on every rank.
    assert runs["ddp2"][1]["bytes"]["params"] == whole


# -- validation before launch --------------------------------------------------------------


def layout(world: int, *overrides: str) -> None:
    base = [*TINY_MODEL, "--model.tie_embeddings=false", "--train.seq_len=32"]
    resolve(load_config(None, [*base, *overrides]), world)


@pytest.mark.parametrize(
    "world,overrides,message",
    [
        (4, ["--parallel.dp_shard=3"], "set parallel.dp_shard=4 (or -1)"),
        (3, ["--parallel.tp=2"], "launch a multiple of 2 processes"),
        (2, ["--parallel.tp=3", "--parallel.dp_shard=1"], "launch 3 processes"),
        (4, ["--parallel.tp=4", "--parallel.dp_shard=1"], "use tp in [1, 2]"),
        (
            2,
            [
                "--parallel.pp=2",
                "--parallel.dp_shard=1",
                "--parallel.schedule=DualPipeV",
                "--parallel.stages_per_rank=3",
            ],
            "set parallel.stages_per_rank=2",
        ),
        (
            2,
            ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.schedule=Interleaved1F1B"],
            "stages do not divide model.n_layers=2",
        ),
        (
            2,
            ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.split_points=5"],
            "must be 1 increasing layer indices between 1 and 1",
        ),
        (8, ["--train.batch_size=4"], "do not split over 8 data-parallel ranks"),
        (
            2,
            ["--parallel.pp=2", "--parallel.dp_shard=1", "--parallel.microbatches=3"],
            "parallel.microbatches=3",
        ),
        (
            2,
            ["--parallel.tp=2", "--parallel.dp_shard=1", "--train.seq_len=33"],
            "sequence_parallel splits train.seq_len=33",
        ),
        (
            2,
            ["--parallel.pp=2", "--parallel.dp_shard=1", "--model.tie_embeddings=true"],
            "tied embeddings",
        ),
        (2, ["--parallel.dp_shard=0"], "parallel.dp_shard=0 must be at least 1"),
    ],
)
def test_impossible_layouts_are_refused_with_the_fix(
    world: int, overrides: list[str], message: str
) -> None:
    with pytest.raises(LoomError, match=None) as info:
        layout(world, *overrides)
    assert message in str(info.value)


@pytest.mark.slow
def test_tied_embeddings_train_with_tensor_parallelism(data_dir: Path, tmp_path: Path) -> None:
    """The embedding is vocabulary-parallel and is also the output projection: tp 2 (with and
    without sequence and loss parallelism) trains the tied model one process trains."""
    args = [*base_args(data_dir), "--model.tie_embeddings=true"]
    single = Trainer(load_config(None, [*args, f"--run_dir={tmp_path / 'single'}"])).run()
    layouts = {
        "tp2": ["--parallel.tp=2", "--parallel.dp_shard=1"],
        "tp2_plain": [
            "--parallel.tp=2",
            "--parallel.dp_shard=1",
            "--parallel.sequence_parallel=false",
            "--parallel.loss_parallel=false",
        ],
    }
    spec = [
        {"name": name, "args": [*args, f"--run_dir={tmp_path / name}", *extra]}
        for name, extra in layouts.items()
    ]
    records = launch(2, spec, tmp_path)
    cfg = load_config(None, args)
    reference = final_params(cfg, tmp_path / "single")
    assert "lm_head.weight" not in reference  # one tensor for both ends
    for name in layouts:
        losses = {int(k): v for k, v in records[name][0]["losses"].items()}
        assert losses == pytest.approx(single.train_losses, abs=1e-5), name
        got = final_params(cfg, tmp_path / name)
        assert max((got[k] - reference[k]).abs().max().item() for k in reference) <= 1e-4


@pytest.mark.slow
def test_ring_attention_equals_full_attention_forward_and_backward(tmp_path: Path) -> None:
    """Keys and values passed round the ring, merged by online softmax, with chunk pairs above
    the diagonal skipped: output and the gradients of q, k and v equal full attention's within
    1e-5 on every rank (fp32, grouped-query heads, cp 4 and cp 2, causal and packed documents,
    queries in one tile and in tiles of a few rows, value heads narrower than the keys' as in
    latent attention)."""
    script = Path(__file__).parent / "ring_attention_ranks.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4"]
    done = subprocess.run([*cmd, str(script), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(4):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert sorted(results) == [
            "cp2_causal",
            "cp2_documents",
            "cp2_documents_tiled",
            "cp2_narrow_values",
            "cp4_causal",
            "cp4_documents",
        ]
        for case, errors in results.items():
            assert max(errors) <= 1e-5, (rank, case, errors)


@pytest.mark.slow
def test_context_parallel_layouts_match_one_process(
    runs: dict[str, Any], data_dir: Path, tmp_path: Path
) -> None:
    """Each sequence split over cp ranks (two balanced chunks each), ring attention: cp 4 (with
    selective recomputation, which recomputes the ring whole), and cp 2 with FSDP 2, with 2
    replicas, with tp 2 (sequence and loss parallel) and with pp 2, train as one process does
    (forward and backward of attention included), validation too.
    (pp 2 × cp 2 × tp 2 is in LAYOUTS.)"""
    args = base_args(data_dir)
    one = "--parallel.dp_shard=1"
    layouts = {
        "cp4_selective": ["--parallel.cp=4", "--memory.recompute=selective"],
        "cp2_fsdp2": ["--parallel.cp=2"],
        "cp2_hsdp2": ["--parallel.cp=2", "--parallel.dp_replicate=2"],
        "cp2_tp2_sp": [
            "--parallel.cp=2",
            "--parallel.tp=2",
            one,
            "--parallel.sequence_parallel=true",
            "--parallel.loss_parallel=true",
        ],
        "cp2_pp2": ["--parallel.cp=2", "--parallel.pp=2", one, "--parallel.schedule=1F1B"],
    }
    spec = [
        {"name": name, "args": [*args, f"--run_dir={tmp_path / name}", *extra]}
        for name, extra in layouts.items()
    ]
    records = launch(4, spec, tmp_path)
    cfg = load_config(None, args)
    reference = final_params(cfg, runs["root"] / "single")
    assert [records[name][0]["layout"] for name in layouts] == [
        "cp 4",
        "dp_shard 2 × cp 2",
        "dp_replicate 2 × cp 2",
        "cp 2 × tp 2",
        "pp 2 × cp 2",
    ]
    for name in layouts:
        losses = {int(k): v for k, v in records[name][0]["losses"].items()}
        assert losses == pytest.approx(runs["single"], abs=1e-5), name
        assert all(r["losses"] == records[name][0]["losses"] for r in records[name].values())
        val = records[name][0]["val_losses"][str(STEPS)]
        assert val == pytest.approx(runs["single_val"], abs=1e-5), name
        got = final_params(cfg, tmp_path / name)
        assert max((got[k] - reference[k]).abs().max().item() for k in reference) <= 1e-4


def test_default_dp_shard_takes_the_rest_of_the_world() -> None:
    base = [*TINY_MODEL, "--model.tie_embeddings=false", "--train.seq_len=32"]
    dims = resolve(load_config(None, [*base, "--parallel.tp=2"]), 8)
    assert (dims.dp_shard, dims.tp, dims.dp) == (4, 2, 4)
    v_shape = ["--model.n_layers=4", "--parallel.pp=2", "--parallel.schedule=ZBVZeroBubble"]
    v = resolve(load_config(None, [*base, *v_shape]), 2)
    assert (v.stages_per_rank, v.num_stages, v.microbatches) == (2, 4, 4)


def test_offloading_parameters_needs_a_process_group(
    tiny_config: Any,
) -> None:
    with pytest.raises(LoomError, match="--nproc"):
        Trainer(tiny_config("--memory.offload=params"))


@pytest.mark.parametrize(
    "mode,every,recomputed",
    [("none", 1, []), ("full", 1, ["0", "1", "2", "3"]), ("selective", 2, ["0", "2"])],
)
def test_recompute_reruns_the_chosen_blocks_in_backward(
    tiny_config: Any, mode: str, every: int, recomputed: list[str]
) -> None:
    trainer = Trainer(
        tiny_config(
            "--model.n_layers=4", f"--memory.recompute={mode}", f"--memory.recompute_every={every}"
        )
    )
    model = trainer.model.parts[0]
    calls: dict[str, int] = {}
    for key, block in model.layers.items():
        mlp = block.get_submodule("_checkpoint_wrapped_module.mlp" if key in recomputed else "mlp")

        def counted(x: torch.Tensor, key: str = key, forward: Any = mlp.forward) -> torch.Tensor:
            calls[key] = calls.get(key, 0) + 1  # (module hooks do not fire when recomputing)
            return forward(x)

        mlp.forward = counted
    trainer.forward_backward()  # one optimizer step = one micro-batch here
    assert calls == {k: 2 if k in recomputed else 1 for k in model.layers}


PREDICTED = {  # layout -> its strategy for the planner
    "ddp2": dict(dp=2),
    "fsdp2": dict(dp=2, zero_stage=3),
    "fsdp4": dict(dp=4, zero_stage=3),
    "tp2": dict(tp=2, sp=True),
    "pp2_1F1B": dict(pp=2),
    "fsdp2_tp2": dict(dp=2, tp=2, sp=True, zero_stage=3),
    "pp2_fsdp2": dict(dp=2, pp=2, zero_stage=3),
    "pp2_fsdp2_tp2": dict(dp=2, pp=2, tp=2, sp=True, zero_stage=3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PREDICTED))
def test_planner_predicts_the_bytes_each_layout_holds(
    runs: dict[str, Any], data_dir: Path, name: str
) -> None:
    """Weights, gradients and Adam state per device, as the planner predicts them for Loom
    (fp32, 4 + 4 + 8 bytes per parameter), against what the busiest rank really holds."""
    from loom.planner.memory import estimate
    from loom.planner.spec import Strategy, gpu_hardware, model_from_config

    cfg = load_config(None, base_args(data_dir))
    model = model_from_config(cfg.model, cfg.train.seq_len)
    strategy = Strategy(precision="fp32", framework="loom", **PREDICTED[name])
    memory = estimate(model, gpu_hardware("h100", strategy.devices), strategy)
    predicted = (memory.params, memory.grads, memory.optimizer)
    measured = [runs[name][r]["bytes"] for r in runs[name]]
    n = strategy.dp if strategy.zero_stage == 3 else 1
    # FSDP splits every tensor by rows: a rank holds at most one row per tensor more than 1/n.
    padding = sum(4 * p.numel() // p.shape[0] for p in build_model(cfg.model).parameters())
    for kind, value in zip(("params", "grads", "optimizer"), predicted, strict=True):
        busiest = max(m[kind] for m in measured)
        slack = padding * (2 if kind == "optimizer" else 1) if n > 1 else 0
        assert value - slack <= busiest <= value + slack, (kind, busiest, value)


@pytest.mark.slow
def test_latent_attention_under_tp_and_cp_trains_like_one_process(
    tiny_config, data_dir: Path, tmp_path: Path
) -> None:
    """DeepSeek's latent attention split by heads over tp (with and without sequence
    parallelism, and with cp 2): the shared rotary key's gradient is summed over the tp ranks,
    so losses and final weights equal one process's."""
    from conftest import tiny_args

    from loom.eval.generate import load_for_generation
    from loom.train.trainer import train

    mla = ["--model.n_kv_heads=4", "--model.head_dim=20", "--model.q_lora_rank=24"]
    mla += ["--model.kv_lora_rank=16", "--model.rope_head_dim=8", "--model.v_head_dim=10"]
    mla += ["--train.batch_size=4", "--metrics.tensorboard=false"]
    single = train(tiny_config(*mla, run_dir=tmp_path / "single"))
    layouts = {
        "fsdp2_tp2": ["--parallel.tp=2", "--parallel.sequence_parallel=false"],
        "fsdp2_tp2_sp": ["--parallel.tp=2", "--parallel.sequence_parallel=true"],
        "cp2_tp2": ["--parallel.cp=2", "--parallel.tp=2", "--parallel.dp_shard=1"],
    }
    spec = [
        {"name": n, "args": tiny_args(data_dir, tmp_path / n, *mla, *a)} for n, a in layouts.items()
    ]
    records = launch(4, spec, tmp_path)
    reference = load_for_generation(tmp_path / "single", torch.device("cpu"))[0].state_dict()
    for name in layouts:
        losses = {int(k): v for k, v in records[name][0]["losses"].items()}
        assert losses == pytest.approx(single.train_losses, abs=1e-5), name
        state = load_for_generation(tmp_path / name, torch.device("cpu"))[0].state_dict()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, atol=1e-4, rtol=0, msg=name)
    # the planner's weights per rank under tp 2 × FSDP 2 (the down-projections whole on each
    # tp rank) against what each rank holds
    from loom.planner.memory import estimate
    from loom.planner.spec import Strategy, gpu_hardware, model_from_config

    model = model_from_config(tiny_config(*mla).model, 32)
    strategy = Strategy(precision="fp32", tp=2, dp=2, zero_stage=3)
    predicted = estimate(model, gpu_hardware("h100", 4), strategy).params
    held = [r["bytes"]["params"] for r in records["fsdp2_tp2"].values()]
    assert max(held) == pytest.approx(predicted, rel=0.02)
