"""memory.offload=optimizer and its NVMe tier (memory.offload_dir, memory.host_budget_gb).

Through the real Trainer: losses equal a run without offload (fp32 1e-6, bf16 1e-3 over 20
steps), the AdamW state lives in the offload buffers or files (bytes checked), checkpoints
resume across offload and none both ways, LoRA moves only adapter state, bf16 parameters step
on fp32 master weights in the store, and FSDP and DDP ranks offload their shards (one torchrun
launch).

This file is also the script its torchrun launch runs: `torchrun ... test_offload.py dist SPEC
OUT`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_MODEL
from torch.distributed.tensor import DTensor

from loom.core.config import Config, load_config
from loom.core.lora import LoRAConfig, apply_lora, init_lora_parameter_
from loom.core.loss import cross_entropy
from loom.models.llama import init_parameter_
from loom.parallel.dims import resolve
from loom.parallel.parallelize import parallelize
from loom.train.metrics import read_metrics
from loom.train.offload import STATE_KINDS, WINDOW, FileStore, OffloadAdamW, local
from loom.train.optim import build_optimizer
from loom.train.trainer import Trainer

HERE = Path(__file__)
CONFIG = HERE.parents[1] / "configs" / "tiny.toml"
STEPS = 20
TOLERANCE = {"fp32": 1e-6, "bf16": 1e-3}
TINY_BUDGET = "--memory.host_budget_gb=0.0001"  # chunks of 3072 elements: ~30 per step


def run_args(data_dir: Path, run_dir: Path) -> list[str]:
    return [
        *TINY_MODEL,
        f"--data.path={data_dir}",
        f"--run_dir={run_dir}",
        f"--train.steps={STEPS}",
        "--train.batch_size=4",
        "--train.seq_len=32",
        "--train.eval_interval=0",
        "--train.eval_batches=2",
        "--optimizer.warmup_steps=2",
        "--optimizer.lr=3e-3",
        f"--optimizer.decay_steps={STEPS}",  # one schedule, however many steps a call runs
        "--metrics.log_interval=1",
        "--metrics.progress=plain",
        "--metrics.tensorboard=false",
        "--checkpoint.interval=4",
    ]


def config(data_dir: Path, run_dir: Path, *extra: str) -> Config:
    return load_config(None, [*run_args(data_dir, run_dir), *extra])


def trained(cfg: Config) -> tuple[Trainer, dict[int, float]]:
    trainer = Trainer(cfg)
    return trainer, trainer.run().train_losses


def offload_optimizer(trainer: Trainer) -> OffloadAdamW:
    (optimizer,) = trainer.optimizers.optimizers
    assert isinstance(optimizer, OffloadAdamW)
    return optimizer


def trainable_numel(trainer: Trainer) -> int:
    return sum(local(p).numel() for p in trainer.model.parts[0].parameters() if p.requires_grad)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_losses_equal_a_run_without_offload_and_the_state_lives_offloaded(
    precision: str, data_dir: Path, tmp_path: Path
) -> None:
    args = (f"--train.precision={precision}",)
    plain, plain_losses = trained(config(data_dir, tmp_path / "none", *args))
    host, host_losses = trained(
        config(data_dir, tmp_path / "host", *args, "--memory.offload=optimizer")
    )
    tier_dir = tmp_path / "tier"
    tier, tier_losses = trained(
        config(
            data_dir,
            tmp_path / "nvme",
            *args,
            "--memory.offload=optimizer",
            f"--memory.offload_dir={tier_dir}",
            TINY_BUDGET,
        )
    )
    assert len(plain_losses) == STEPS
    for step, loss in plain_losses.items():
        assert abs(host_losses[step] - loss) <= TOLERANCE[precision]
    assert tier_losses == host_losses  # the same kernel on the same elements, chunked otherwise

    numel = trainable_numel(host)
    memory, files = offload_optimizer(host), offload_optimizer(tier)
    # In memory: exp_avg and exp_avg_sq of every parameter are views of the host buffers.
    assert not memory.master  # fp32 host parameters are their own master weights
    assert memory.host_bytes == len(STATE_KINDS) * 4 * numel
    for kind in STATE_KINDS:
        storage = memory.store.view(kind).untyped_storage().data_ptr()
        for state in memory.state.values():
            assert state[kind].untyped_storage().data_ptr() == storage
    # The same numbers as torch's AdamW holds for the run without offload (bf16: as close as
    # its rounding lets two runs stay).
    relative = 1e-4 if precision == "fp32" else 5e-2
    plain_state = plain.optimizers.optimizers[0].state
    pairs = zip(plain.model.parts[0].parameters(), host.model.parts[0].parameters(), strict=True)
    for p_plain, p_host in pairs:
        for kind in STATE_KINDS:
            expected = plain_state[p_plain][kind]
            error = (memory.state[p_host][kind] - expected).norm() / expected.norm()
            assert error <= relative
    # NVMe tier: the state is in the files (byte for byte the in-memory run's), and the host
    # holds only the window.
    assert isinstance(files.store, FileStore)
    for kind in STATE_KINDS:
        on_disk = torch.from_file(str(files.store.paths[kind]), size=numel)
        assert torch.equal(on_disk, memory.store.view(kind))
    assert files.host_bytes == WINDOW * len(STATE_KINDS) * 4 * files.store.chunk
    assert files.host_bytes <= 0.0001e9 < len(STATE_KINDS) * 4 * numel
    assert len(files.chunks) > WINDOW


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (["--memory.offload=optimizer"], []),
        ([], ["--memory.offload=optimizer", "--memory.offload_dir={tier}", TINY_BUDGET]),
    ],
    ids=["offload_to_none", "none_to_nvme"],
)
def test_checkpoints_resume_across_offload(
    first: list[str], second: list[str], data_dir: Path, tmp_path: Path
) -> None:
    steps = ["--train.steps=8"]
    _, straight = trained(config(data_dir, tmp_path / "straight", *steps))
    run = tmp_path / "run"
    second = [a.format(tier=tmp_path / "tier") for a in second]
    trained(config(data_dir, run, "--train.steps=4", *first))
    _, resumed = trained(config(data_dir, run, *steps, *second))
    assert sorted(resumed) == [5, 6, 7, 8]
    for step, loss in resumed.items():
        assert abs(loss - straight[step]) <= TOLERANCE["fp32"]


def lora_model(cfg: Config) -> Any:
    def init(name: str, tensor: torch.Tensor) -> None:
        if not init_lora_parameter_(name, tensor, 0):
            init_parameter_(cfg.model, name, tensor, 0)

    adapt = lambda part: apply_lora(part, LoRAConfig(rank=4))  # noqa: E731
    return parallelize(cfg, resolve(cfg, 1), None, torch.device("cpu"), cross_entropy, adapt, init)


def test_lora_moves_only_adapter_state() -> None:
    """The optimizer the Trainer builds for a LoRA model: adapter state only, same losses."""
    losses = {}
    for offload in ("none", "optimizer"):
        cfg = load_config(None, [*TINY_MODEL, "--train.seq_len=32", f"--memory.offload={offload}"])
        model = lora_model(cfg)
        part = model.parts[0]
        optimizer = build_optimizer(part, cfg.optimizer, cfg.memory)
        generator = torch.Generator().manual_seed(0)
        losses[offload] = []
        for _ in range(STEPS):
            tokens = torch.randint(0, cfg.model.vocab_size, (4, 33), generator=generator)
            losses[offload].append(model.forward_backward(tokens[:, :-1], tokens[:, 1:], 1.0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    assert isinstance(optimizer, OffloadAdamW)
    adapters = {p for n, p in part.named_parameters() if "lora_" in n}
    assert adapters and set(optimizer.state) == adapters
    adapter_numel = sum(p.numel() for p in adapters)
    assert adapter_numel < sum(p.numel() for p in part.parameters()) / 10
    assert optimizer.host_bytes == len(STATE_KINDS) * 4 * adapter_numel
    for a, b in zip(losses["none"], losses["optimizer"], strict=True):
        assert abs(a.item() - b.item()) <= TOLERANCE["fp32"]


def test_low_precision_parameters_step_on_fp32_master_weights(tmp_path: Path) -> None:
    """bf16 parameters: the fp32 master copy lives in the offload store (here the files) and
    steps exactly as torch's fused AdamW steps fp32 weights fed the same gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Linear(96, 8)).bfloat16()
    reference = [p.detach().float().clone().requires_grad_() for p in model.parameters()]
    ours = OffloadAdamW(
        [{"params": list(model.parameters()), "weight_decay": 0.1}],
        lr=1e-2,
        betas=(0.9, 0.95),
        eps=1e-8,
        directory=tmp_path / "tier",
        budget_bytes=200_000,
    )
    theirs = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    assert ours.master and len(ours.chunks) > 1
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    for _ in range(5):
        model(x).float().pow(2).mean().backward()
        for p, r in zip(model.parameters(), reference, strict=True):
            r.grad = p.grad.float()
        ours.step()
        theirs.step()
        ours.zero_grad(set_to_none=True)
    master = torch.from_file(str(ours.store.paths["master"]), size=ours.chunks[-1].stop)
    assert torch.equal(master, torch.cat([r.detach().reshape(-1) for r in reference]))
    for p, r in zip(model.parameters(), reference, strict=True):
        assert torch.equal(p, r.detach().bfloat16())


# -- the NVMe tier's host memory: peak RSS of `loom train` processes ------------------------------

RSS_BUDGET_GB = 0.1
# About 27M parameters (8 bytes of AdamW state each: ~0.2 GB, twice the budget), a batch of
# 16 tokens: the state dominates what the step adds to the process.
RSS_MODEL = [
    "--model.dim=1024",
    "--model.n_layers=2",
    "--model.n_heads=8",
    "--model.n_kv_heads=8",
    "--model.ffn_hidden=2816",
]


def peak_rss_run(
    data_dir: Path, run_dir: Path, *extra: str, faults: str = ""
) -> subprocess.Popen[str]:
    """`loom train` for 3 steps in its own process (one process's peak RSS is its own)."""
    cmd = [sys.executable, "-m", "loom.cli", "train", str(CONFIG), *TINY_MODEL, *RSS_MODEL]
    cmd += [
        f"--data.path={data_dir}",
        f"--run_dir={run_dir}",
        "--train.steps=3",
        "--train.batch_size=1",
        "--train.micro_batch_size=1",
        "--train.seq_len=16",
        "--train.precision=fp32",
        "--train.eval_interval=0",
        "--metrics.log_interval=1",
        "--metrics.progress=plain",
        "--metrics.tensorboard=false",
        "--checkpoint.interval=100",
        "--resilience.max_bad_steps=10",
        *extra,
    ]
    env = {**os.environ, "LOOM_FAULTS": faults}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finished(process: subprocess.Popen[str], run_dir: Path) -> tuple[dict[int, float], float]:
    """Per-step losses, and the peak RSS in bytes up to the end of the last step (the metrics
    record's `peak_mem_gib` is the process's own VmHWM on a CPU, logged before the last
    checkpoint is written)."""
    _, err = process.communicate(timeout=300)  # a guard against a hang, not a speed check
    assert process.returncode == 0, err[-3000:]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    return {r["step"]: r["loss"] for r in records}, records[-1]["peak_mem_gib"] * 2**30


@pytest.mark.slow
def test_nvme_tier_keeps_peak_rss_growth_under_the_host_budget(
    data_dir: Path, tmp_path: Path
) -> None:
    """Three processes, one model. The baseline holds no optimizer state at all: every step is
    a NaN step (LOOM_FAULTS), so AdamW never steps and never allocates its state, while the
    model, gradients, activations and everything else are as in the others. The in-memory run
    must show the whole state in its peak (the measurement sees it); the NVMe run must add no
    more than `memory.host_budget_gb` to the baseline's peak, with the same losses."""
    tier = tmp_path / "tier"
    runs = {
        "base": peak_rss_run(data_dir, tmp_path / "base", faults="nan@1-3"),
        "host": peak_rss_run(data_dir, tmp_path / "host", "--memory.offload=optimizer"),
        "nvme": peak_rss_run(
            data_dir,
            tmp_path / "nvme",
            "--memory.offload=optimizer",
            f"--memory.offload_dir={tier}",
            f"--memory.host_budget_gb={RSS_BUDGET_GB}",
        ),
    }
    results = {name: finished(process, tmp_path / name) for name, process in runs.items()}
    (base_losses, base), (host_losses, host), (nvme_losses, nvme) = results.values()
    assert all(math.isnan(loss) for loss in base_losses.values())
    state_bytes = sum(path.stat().st_size for path in (tier / "rank0-part0").glob("*.bin"))
    assert {p.name for p in (tier / "rank0-part0").iterdir()} == {f"{k}.bin" for k in STATE_KINDS}
    budget = RSS_BUDGET_GB * 1e9
    assert state_bytes > 2 * budget  # the state would not fit the budget
    assert host - base >= 0.9 * state_bytes  # in memory: the whole state is resident
    assert nvme - base <= budget  # in files: a window of it
    assert nvme_losses == host_losses


# -- two processes: FSDP and DDP ------------------------------------------------------------------

DIST_JOBS = {
    "fsdp2": [],
    "fsdp2_offload": ["--memory.offload=optimizer"],
    "fsdp2_nvme": ["--memory.offload=optimizer", "--memory.offload_dir={root}/tier", TINY_BUDGET],
    "ddp2_offload": [
        "--memory.offload=optimizer",
        "--parallel.dp_replicate=2",
        "--parallel.dp_shard=1",
    ],
}


def run_dist(spec_file: Path, out: Path) -> None:
    """Under torchrun: each job through the real Trainer; each rank writes what it held."""
    from loom.core import distributed

    distributed.init_process_group(torch.device("cpu"), timeout_s=300)
    for job in json.loads(spec_file.read_text()):
        trainer, losses = trained(load_config(None, job["args"]))
        optimizer = trainer.optimizers.optimizers[0]
        record: dict[str, Any] = {"losses": losses, "local_numel": trainable_numel(trainer)}
        if isinstance(optimizer, OffloadAdamW):
            record["host_bytes"] = optimizer.host_bytes
            record["numel_in_store"] = optimizer.chunks[-1].stop
            record["dtensor_state"] = all(
                isinstance(s["exp_avg"], DTensor) == isinstance(p, DTensor)
                for p, s in optimizer.state.items()
            )
        rank = distributed.rank()
        (out / f"{job['name']}.rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_fsdp_and_ddp_ranks_offload_their_shards(data_dir: Path, tmp_path: Path) -> None:
    _, single = trained(config(data_dir, tmp_path / "single"))
    spec = [
        {
            "name": name,
            "args": [
                *run_args(data_dir, tmp_path / name),
                *(a.format(root=tmp_path) for a in extra),
            ],
        }
        for name, extra in DIST_JOBS.items()
    ]
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += [str(HERE), "dist", str(spec_file), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    records = {
        (name, rank): json.loads((tmp_path / f"{name}.rank{rank}.json").read_text())
        for name in DIST_JOBS
        for rank in (0, 1)
    }
    whole = sum(records["fsdp2", r]["local_numel"] for r in (0, 1))
    for (name, _), record in records.items():
        for step, loss in record["losses"].items():
            assert abs(loss - single[int(step)]) <= 1e-5, (name, step)
        if name == "fsdp2":
            continue
        assert record["dtensor_state"]
        # FSDP: each rank's store holds its shard's state; DDP: every rank the whole state.
        expected = whole if name.startswith("ddp") else record["local_numel"]
        assert record["numel_in_store"] == expected
        if name == "fsdp2_offload":
            assert expected < whole
            assert record["host_bytes"] == len(STATE_KINDS) * 4 * expected


if __name__ == "__main__":
    if sys.argv[1] == "dist":
        run_dist(Path(sys.argv[2]), Path(sys.argv[3]))
