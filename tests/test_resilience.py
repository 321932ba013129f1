"""Fault tolerance with real failures: workers SIGKILLed (from outside and by injection), a hang
caught by the watchdog, a crash in the middle of a checkpoint write, SIGTERM, NaN steps,
and resizing a run between 4, 2 and 1 processes. The reference for "nothing lost, nothing
changed" is the same run without faults: its per-step losses must come out bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from test_launch import finish, loom_train

from loom.core.checkpoint import Checkpointer, load_model_weights, verify
from loom.core.config import ResilienceConfig, load_config
from loom.core.errors import LoomError
from loom.data.loader import TokenLoader
from loom.data.shards import TokenDataset
from loom.models.llama import build_model
from loom.train.metrics import read_metrics
from loom.train.resilience import GoodputLedger, StepGuard, parse_faults
from loom.train.trainer import Trainer

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.toml"
STEPS = 30
BATCH = 8
SEQ = 32


@pytest.fixture(scope="module")
def small_data(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A dataset of about a hundred 32-token samples: a few steps make an epoch."""
    from loom.data.tokenize import TokenizeOptions, tokenize_to_shards

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    src = tmp_path_factory.mktemp("small-text")
    for name in ("bisect.py", "colorsys.py", "keyword.py"):
        shutil.copy(stdlib / name, src / name)
    out = tmp_path_factory.mktemp("small-shards")
    tokenize_to_shards(
        TokenizeOptions(
            inputs=[f"{src}/*.py"], tokenizer=str(tokenizer_dir), out=str(out), val_fraction=0.1
        )
    )
    return out


def args(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *TINY_MODEL,
        "--model.tie_embeddings=false",
        f"--data.path={data}",
        f"--run_dir={run_dir}",
        f"--train.steps={STEPS}",
        f"--train.batch_size={BATCH}",
        f"--train.seq_len={SEQ}",
        "--train.precision=fp32",
        "--train.eval_interval=0",
        f"--optimizer.decay_steps={STEPS}",  # the same schedule when a run stops early
        "--metrics.log_interval=1",
        "--metrics.progress=plain",
        "--metrics.tensorboard=false",
        "--metrics.sample_log=true",
        "--checkpoint.interval=4",
        "--checkpoint.keep=10",
        *extra,
    ]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def launch(data: Path, run_dir: Path, *extra: str, nproc: int = 2, faults: str = "") -> str:
    """`loom train --nproc N` to the end; returns stderr."""
    env_before = os.environ.get("LOOM_FAULTS")
    os.environ["LOOM_FAULTS"] = faults
    try:
        process = loom_train("--nproc", str(nproc), *args(data, run_dir), *extra)
    finally:
        os.environ.pop("LOOM_FAULTS")
        if env_before is not None:
            os.environ["LOOM_FAULTS"] = env_before
    code, err = finish(process)
    assert code == 0, err[-4000:]
    return err


@pytest.fixture(scope="module")
def reference(small_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, float]:
    """Per-step losses of the run on 2 ranks with no fault."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    launch(small_data, run_dir)
    result = losses(run_dir)
    assert sorted(result) == list(range(1, STEPS + 1))
    return result


def wait_for_step(run_dir: Path, rank: int, step: int) -> int:
    """The pid of `rank` once it is in `step` or later (from the notes the trainer keeps)."""
    note = run_dir / ".ranks" / f"rank-{rank}.json"
    deadline = time.monotonic() + 120  # a guard against a hang, not a speed check
    while time.monotonic() < deadline:
        try:
            record = json.loads(note.read_text())
            if record["step"] >= step:
                return int(record["pid"])
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"rank {rank} never reached step {step}")


# -- restarts: SIGKILL, hang, crash in a checkpoint write --------------------------------------


@pytest.mark.slow
def test_killed_and_hung_workers_restart_and_match_the_uninterrupted_run(
    small_data: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    run_dir = tmp_path / "run"
    # Attempt 0: rank 1 is SIGKILLed at step 7. Attempt 1: rank 0 hangs in step 10.
    # Attempt 2: every rank raises in step 15.
    err = launch(
        small_data,
        run_dir,
        "--max-restarts",
        "3",
        "--checkpoint.async=true",
        "--resilience.hang_timeout_s=3",
        faults="kill@7:rank=1,hang@10:rank=0:attempt=1,raise@15:attempt=2",
    )
    assert losses(run_dir) == reference  # bit for bit
    ledger = json.loads((run_dir / "goodput.json").read_text())
    assert ledger["restarts"] == 3
    assert ledger["high_water"] == STEPS
    # Each restart resumes from a checkpoint step (interval 4) before the failing step: the
    # newest one, or with an async save still in flight when the fault hits, the one before.
    failing = [7, 10, 15]
    resumed = [int(s) for s in re.findall(r"resumed from \S+ \(step (\d+)\)", err)]
    assert len(resumed) == len(failing), err[-4000:]
    for fail, step in zip(failing, resumed, strict=True):
        assert step % 4 == 0 and fail - 2 * 4 <= step < fail, (fail, step)
    # Lost work: no more than the steps between each resume point and its failure.
    lost = sum(fail - 1 - step for fail, step in zip(failing, resumed, strict=True))
    assert 0 < ledger["recomputed_steps"] <= lost
    assert 0 < ledger["goodput"] < 1
    dump = (run_dir / "hangs" / "rank-0-attempt-1.txt").read_text()
    assert "step 10 took longer than resilience.hang_timeout_s=3" in dump
    assert "in at_step_start" in dump  # the stack of the hung call
    assert not (run_dir / "hangs" / "rank-0-attempt-3.txt").exists()  # cleaned when all went well


@pytest.mark.slow
def test_worker_killed_from_outside_restarts_under_loom_torchrun(
    small_data: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    run_dir = tmp_path / "run"
    torchrun = ["torchrun", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1"]
    worker = ["-m", "loom.train", str(CONFIG), *args(small_data, run_dir)]
    process = subprocess.Popen(
        [sys.executable, "-m", "loom.cli", *torchrun, *worker],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.kill(wait_for_step(run_dir, 1, 6), signal.SIGKILL)
    code, err = finish(process)
    assert code == 0, err[-4000:]
    assert losses(run_dir) == reference
    assert json.loads((run_dir / "goodput.json").read_text())["restarts"] == 1


@pytest.mark.slow
def test_crash_during_checkpoint_write_keeps_the_previous_one(
    small_data: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    run_dir = tmp_path / "run"
    os.environ["LOOM_FAULTS"] = "checkpoint@8:rank=0"
    try:
        process = loom_train("--nproc", "2", *args(small_data, run_dir))
    finally:
        del os.environ["LOOM_FAULTS"]
    code, err = finish(process)
    assert code != 0 and "rank 0 was killed by SIGKILL in step 8" in err, err[-3000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "step-8.tmp").is_dir()  # its shards were written, the commit was not
    assert (checkpoints / "latest").resolve().name == "step-4"
    assert verify(checkpoints / "latest") is None
    launch(small_data, run_dir)  # the same command again resumes from step 4
    assert losses(run_dir) == reference
    assert not (checkpoints / "step-8.tmp").exists()


@pytest.mark.slow
def test_sigterm_saves_at_the_current_step_and_the_next_start_continues(
    small_data: Path, tmp_path: Path, reference: dict[int, float]
) -> None:
    run_dir = tmp_path / "run"
    process = loom_train("--nproc", "2", *args(small_data, run_dir))
    wait_for_step(run_dir, 0, 6)
    process.send_signal(signal.SIGTERM)  # to the launcher, which passes it to the workers
    code, err = finish(process)
    assert code == 0, err[-3000:]
    assert "stopped by SIGTERM" in err
    stopped_at = max(losses(run_dir))
    assert 6 <= stopped_at < STEPS
    assert (run_dir / "checkpoints" / "latest").resolve().name == f"step-{stopped_at}"
    launch(small_data, run_dir)
    assert losses(run_dir) == reference


@pytest.mark.slow
def test_nvme_tier_killed_mid_step_resumes_like_the_uninterrupted_run(
    small_data: Path, tmp_path: Path
) -> None:
    """memory.offload=optimizer with memory.offload_dir: a rank SIGKILLed while its optimizer
    writes the tier's files (step 7, after the checkpoint of step 4) leaves files newer than
    the checkpoint; the same command again must not trust them. The tier's files are scratch,
    recreated empty at start; the checkpoint holds exp_avg and exp_avg_sq (read through the
    files' memory map) and loading it writes them back. Losses and weights match the same
    command run without a kill, bit for bit."""
    tier = ["--memory.offload=optimizer", "--memory.host_budget_gb=0.0001"]  # ~30 chunks a step
    straight = tmp_path / "straight"
    launch(small_data, straight, *tier, f"--memory.offload_dir={tmp_path / 'tier-straight'}")

    run_dir, files = tmp_path / "run", tmp_path / "tier"
    command = [*args(small_data, run_dir), *tier, f"--memory.offload_dir={files}"]
    process = loom_train("--nproc", "2", *command)
    pid = wait_for_step(run_dir, 1, 7)
    state = files / "rank1-part0" / "exp_avg.bin"
    written = state.stat().st_mtime_ns
    deadline = time.monotonic() + 120  # a guard against a hang, not a speed check
    while state.stat().st_mtime_ns == written:  # the optimizer is writing its state
        assert time.monotonic() < deadline, "the optimizer step never wrote its state"
        time.sleep(0.001)
    os.kill(pid, signal.SIGKILL)
    code, err = finish(process)
    # Step 7's write, or step 8's if step 7's came before the first look (before its checkpoint).
    assert code != 0 and re.search("rank 1 was killed by SIGKILL in step [78]", err), err[-3000:]
    assert (run_dir / "checkpoints" / "latest").resolve().name == "step-4"
    assert state.stat().st_size > 0  # left behind, with later steps' state than the checkpoint

    launch(small_data, run_dir, *tier, f"--memory.offload_dir={files}")
    assert losses(run_dir) == losses(straight)
    cfg = load_config(CONFIG, args(small_data, run_dir))
    weights = []
    for run in (run_dir, straight):
        model = build_model(cfg.model, "cpu")
        load_model_weights(run / "checkpoints" / f"step-{STEPS}", model)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


# -- elastic resize ----------------------------------------------------------------------------


@pytest.mark.slow
def test_resize_4_2_1_sees_every_sample_once_per_epoch(small_data: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = load_config(CONFIG, args(small_data, run_dir))
    plan = [(2, 8), (1, 14), (2, 18), (4, 24), (2, STEPS)]  # (processes, train until step)
    for nproc, until in plan:
        if nproc == 1:
            Trainer(load_config(CONFIG, args(small_data, run_dir, f"--train.steps={until}"))).run()
        else:
            launch(small_data, run_dir, f"--train.steps={until}", nproc=nproc)
    per_step: dict[int, dict[int, list[list[int]]]] = {}
    for log in (run_dir / "samples").glob("rank-*.jsonl"):
        rank = int(log.stem.split("-")[1])
        for line in log.read_text().splitlines():
            record = json.loads(line)
            per_step.setdefault(record["step"], {})[rank] = record["samples"]
    assert sorted(per_step) == list(range(1, STEPS + 1))
    # Each step's batch, its ranks' shares in rank order, for the layout of the time.
    seen = []
    for step in range(1, STEPS + 1):
        nproc = next(n for n, until in plan if step <= until)
        shares = per_step[step]
        assert sorted(shares)[:nproc] == list(range(nproc))
        seen += [tuple(pair) for rank in range(nproc) for pair in shares[rank]]
    assert len(seen) == STEPS * BATCH
    # The same stream as one uninterrupted loader ...
    loader = TokenLoader(TokenDataset(small_data).split("train"), SEQ, cfg.train.seed)
    assert seen == [tuple(p) for p in loader.next_indices(STEPS * BATCH).tolist()]
    # ... in which each epoch holds every sample exactly once.
    per_epoch = loader.num_samples[0]
    assert per_epoch < STEPS * BATCH  # the run crosses an epoch boundary
    for start in range(0, len(seen) - per_epoch + 1, per_epoch):
        assert sorted(i for _, i in seen[start : start + per_epoch]) == list(range(per_epoch))


# -- numerical guards (one process, in this one) -----------------------------------------------

MakeConfig = Callable[..., object]


def with_faults(monkeypatch: pytest.MonkeyPatch, faults: str) -> None:
    monkeypatch.setenv("LOOM_FAULTS", faults)


def test_nan_step_is_skipped_and_training_continues(
    tiny_config: MakeConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with_faults(monkeypatch, "nan@3")
    trainer = Trainer(tiny_config("--train.steps=6", "--metrics.log_interval=1"))
    trainer.run()
    records = read_metrics(tmp_path / "run")
    assert math.isnan(records[2]["loss"]) and records[2]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in records[3:])
    # The NaN gradients never reached the weights, and AdamW stepped 5 times, not 6.
    params = list(trainer.model.parts[0].parameters())
    assert all(torch.isfinite(p).all() for p in params)
    state = trainer.optimizers.optimizers[0].state[params[0]]
    assert int(state["step"]) == 5


def test_repeated_nans_roll_back_and_skip_the_offending_batches(
    tiny_config: MakeConfig, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with_faults(monkeypatch, "nan@5-7")
    run = [
        "--train.steps=10",
        "--metrics.log_interval=1",
        "--metrics.sample_log=true",
        "--checkpoint.interval=2",
        "--checkpoint.keep=10",
        "--resilience.max_bad_steps=3",
    ]
    trainer = Trainer(tiny_config(*run))
    trainer.run()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == list(range(1, 11))  # one record per step
    assert all(math.isfinite(r["loss"]) for r in records)
    ledger = json.loads((tmp_path / "run" / "goodput.json").read_text())
    assert ledger["rollbacks"] == 1 and ledger["skipped_steps"] == 3
    # Rolled back to step 4: steps 5-10 trained on the batches after the three bad ones.
    final: dict[int, list[list[int]]] = {}
    for line in (tmp_path / "run" / "samples" / "rank-0.jsonl").read_text().splitlines():
        record = json.loads(line)
        final[record["step"]] = record["samples"]
    splits = [(split, 1.0) for split in trainer.loader.splits]
    stream = TokenLoader(splits, 32, trainer.cfg.train.seed).next_indices(13 * 4)
    batches = [stream[4 * i : 4 * i + 4].tolist() for i in range(13)]
    assert [final[s] for s in range(1, 11)] == batches[:4] + batches[7:]
    state = json.loads((tmp_path / "run" / "checkpoints" / "latest" / "trainer.json").read_text())
    assert state["skip_batches"] == [4, 5, 6]


def test_bad_steps_without_a_checkpoint_stop_with_a_clear_error(
    tiny_config: MakeConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    with_faults(monkeypatch, "nan@1-2")
    trainer = Trainer(tiny_config("--resilience.max_bad_steps=2", "--checkpoint.interval=50"))
    with pytest.raises(LoomError, match="2 bad steps in a row up to step 2 and no checkpoint"):
        trainer.run()


def test_loss_spikes_are_detected_against_the_recent_window() -> None:
    cfg = ResilienceConfig(spike_zscore=4.0, spike_window=20, spike_action="skip")
    guard = StepGuard(cfg)
    noise = np.random.default_rng(0).normal(0, 0.01, 30)
    for step, loss in enumerate(3.0 + noise, 1):
        assert guard.check(step, float(loss), 1.0) is None
    reason = guard.check(31, 3.5, 1.0)  # 50 standard deviations up
    assert reason is not None and reason.startswith("loss spike")
    assert guard.spikes == 1 and guard.skipped == 1 and not guard.rollback_due
    assert guard.check(32, float("inf"), 1.0) == "non-finite loss"
    assert guard.check(33, 3.0, float("nan")) == "non-finite gradient norm"
    assert guard.rollback_due  # 3 in a row
    logged = StepGuard(ResilienceConfig(spike_zscore=4.0, spike_window=20, spike_action="log"))
    for step, loss in enumerate(3.0 + noise, 1):
        logged.check(step, float(loss), 1.0)
    assert logged.check(31, 3.5, 1.0) is None and logged.spikes == 1  # logged, still applied


# -- checkpoints and the ledger ----------------------------------------------------------------


def test_async_checkpoints_train_and_save_exactly_like_sync_ones(
    tiny_config: MakeConfig, tmp_path: Path
) -> None:
    run = ["--train.steps=7", "--checkpoint.interval=3", "--metrics.log_interval=1"]
    Trainer(tiny_config(*run, run_dir=tmp_path / "sync")).run()
    Trainer(tiny_config(*run, "--checkpoint.async=true", run_dir=tmp_path / "async")).run()
    assert losses(tmp_path / "async") == losses(tmp_path / "sync")
    cfg = tiny_config()
    for step in (3, 6, 7):
        a = tmp_path / "async" / "checkpoints" / f"step-{step}"
        assert verify(a) is None
        weights = []
        for path in (a, tmp_path / "sync" / "checkpoints" / f"step-{step}"):
            model = build_model(cfg.model, "cpu")
            load_model_weights(path, model)
            weights.append(model.state_dict())
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # Both resume to the same continuation.
    more = ["--train.steps=9", "--checkpoint.interval=3", "--metrics.log_interval=1"]
    Trainer(tiny_config(*more, run_dir=tmp_path / "sync")).run()
    Trainer(tiny_config(*more, "--checkpoint.async=true", run_dir=tmp_path / "async")).run()
    assert losses(tmp_path / "async") == losses(tmp_path / "sync")


def test_checkpoint_interval_in_minutes(tiny_config: MakeConfig, tmp_path: Path) -> None:
    Trainer(
        tiny_config(
            "--train.steps=5",
            "--checkpoint.interval=1000",
            "--checkpoint.interval_minutes=1e-6",
            "--checkpoint.keep=10",
        )
    ).run()
    saved = [step for step, _ in Checkpointer(tmp_path / "run", 10).steps()]
    assert saved == [1, 2, 3, 4, 5]


def test_goodput_ledger_counts_recomputed_steps_across_attempts(tmp_path: Path) -> None:
    first = GoodputLedger.open(tmp_path, time.time() - 1.0)
    first.training_started()
    for step in range(1, 6):
        time.sleep(0.01)
        first.step_done(step, 0.01)
    first.save()
    second = GoodputLedger.open(tmp_path, time.time())  # a restart resuming from step 3
    second.training_started()
    for step in range(4, 9):
        time.sleep(0.01)
        second.step_done(step, 0.01)
    second.save()
    saved = json.loads((tmp_path / "goodput.json").read_text())
    assert saved["attempts"] == 2 and saved["restarts"] == 1
    assert saved["recomputed_steps"] == 2 and saved["high_water"] == 8
    assert saved["productive_s"] == pytest.approx(0.08)
    assert saved["recomputed_s"] == pytest.approx(0.02)
    parts = ("productive_s", "recomputed_s", "checkpoint_s", "setup_s", "restarts_s")
    assert sum(saved[k] for k in parts) <= saved["wall_s"] + 1e-6
    assert saved["goodput"] == pytest.approx(0.08 / saved["wall_s"])


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("explode@3", "not KIND@STEP"),
        ("kill@x", "not KIND@STEP"),
        ("kill@3:node=1", "unknown option node"),
    ],
)
def test_bad_fault_specs_are_refused(spec: str, message: str) -> None:
    with pytest.raises(LoomError, match=message):
        parse_faults(spec)


def test_fault_specs_parse() -> None:
    (kill, nan) = parse_faults("kill@7:rank=1, nan@3-5:attempt=2")
    assert (kill.kind, kill.first, kill.last, kill.rank, kill.attempt) == ("kill", 7, 7, 1, 0)
    assert (nan.kind, nan.first, nan.last, nan.rank, nan.attempt) == ("nan", 3, 5, None, 2)
