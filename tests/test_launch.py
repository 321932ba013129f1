"""`loom train CONFIG --nproc N`: the real command, real worker processes, real failures.

A worker killed mid-run and a worker that hangs (stopped with SIGSTOP, so its peers wait in a
collective) must both end the run with one error line that names the rank and the step, within
`parallel.timeout_s` plus the launcher's shutdown grace, never an endless hang.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY_MODEL

from loom.core.config import load_config
from loom.train.metrics import read_metrics
from loom.train.trainer import Trainer

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.toml"


def args(data_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        *TINY_MODEL,
        "--model.tie_embeddings=false",
        f"--data.path={data_dir}",
        f"--run_dir={run_dir}",
        "--train.steps=6",
        "--train.batch_size=8",
        "--train.micro_batch_size=4",
        "--train.seq_len=32",
        "--train.precision=fp32",
        "--train.eval_interval=0",
        "--metrics.log_interval=1",
        "--metrics.progress=plain",
        "--checkpoint.interval=3",
        *extra,
    ]


def loom_train(*argv: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "loom.cli", "train", str(CONFIG), *argv]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    _, err = process.communicate(timeout=300)  # a guard against a hang, not a speed check
    return process.returncode, err


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert lines, stderr[-3000:]
    return lines[-1]


@pytest.mark.slow
def test_nproc_launch_trains_like_one_process(data_dir: Path, tmp_path: Path) -> None:
    code, err = finish(
        loom_train("--nproc", "2", *args(data_dir, tmp_path / "run"), "--parallel.tp=2")
    )
    assert code == 0, err[-3000:]
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # rank 0 alone writes
    single = Trainer(load_config(CONFIG, args(data_dir, tmp_path / "single"))).run()
    for r in records:
        assert r["loss"] == pytest.approx(single.train_losses[r["step"]], abs=1e-5)
    state = json.loads((tmp_path / "run/checkpoints/latest/trainer.json").read_text())
    assert state["layout"] == "tp 2"


def test_impossible_layout_is_refused_before_launch(data_dir: Path, tmp_path: Path) -> None:
    code, err = finish(
        loom_train("--nproc", "3", *args(data_dir, tmp_path / "run"), "--parallel.tp=2")
    )
    assert code == 2
    assert error_line(err) == (
        "error: 3 processes do not split into dp_replicate=1 × tp=2 × pp=1 = 2; launch a "
        "multiple of 2 processes or change those degrees"
    )
    assert not (tmp_path / "run").exists()


def wait_for_step(run_dir: Path, rank: int, step: int, process: subprocess.Popen[str]) -> int:
    """The pid of `rank` once it has started `step` (read from the trainer's rank notes)."""
    note = run_dir / ".ranks" / f"rank-{rank}.json"
    while process.poll() is None:
        try:
            record = json.loads(note.read_text())
        except (OSError, ValueError):
            record = {"step": 0}
        if record["step"] >= step:
            return int(record["pid"])
        time.sleep(0.2)
    raise AssertionError(f"the run ended before step {step}: {process.communicate()[1][-3000:]}")


def interrupt(
    data_dir: Path, run_dir: Path, act: Callable[[int], None], *extra: str
) -> tuple[int, str]:
    process = loom_train("--nproc", "2", *args(data_dir, run_dir, "--train.steps=400", *extra))
    pid = wait_for_step(run_dir, 1, 3, process)
    try:
        act(pid)
        return finish(process)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_worker_that_dies_is_reported_with_rank_and_step(data_dir: Path, tmp_path: Path) -> None:
    code, err = interrupt(data_dir, tmp_path / "run", lambda pid: os.kill(pid, signal.SIGKILL))
    assert code == 2
    line = error_line(err)
    assert line.startswith("error: rank 1 was killed by SIGKILL in step "), line
    assert int(line.split("in step ")[1].split(";")[0]) >= 3


@pytest.mark.slow
def test_a_hung_worker_ends_the_run_at_the_timeout(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"

    def hang(pid: int) -> None:
        """Freeze rank 1 so its peer waits in a collective; once the peer has given up, let
        it run on so it acts on the launcher's SIGTERM, as a process blocked in a call does
        (a stopped one would only go at the SIGKILL that follows 30 s later)."""
        os.kill(pid, signal.SIGSTOP)
        rank0 = json.loads((run_dir / ".ranks" / "rank-0.json").read_text())["pid"]
        while os.path.exists(f"/proc/{rank0}") and "Z" not in _state(rank0):
            time.sleep(0.2)
        os.kill(pid, signal.SIGCONT)

    code, err = interrupt(data_dir, run_dir, hang, "--parallel.timeout_s=5")
    assert code == 2
    line = error_line(err)
    # Rank 0 gives up on the collective after parallel.timeout_s and names the phase.
    phase = r"(in step|saving the checkpoint of step|evaluating after step|logging step) \d+"
    assert re.match(rf"error: rank 0 failed {phase}: .*Timed out", line), line
    assert "timeout_s=5" in line
    # Rank 1 is named too when it has exited by the time the launcher reports: killed by the
    # launcher's SIGTERM, or (SIGTERM asks a worker to finish its step) failing in a phase of
    # that step, as rank 0 did.
    if "rank 1" in line:
        assert re.search(rf"rank 1 (was killed by SIGTERM in step \d+|failed {phase})", line), line


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.slow
def test_a_checkpoint_of_another_model_stops_every_rank(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    Trainer(load_config(CONFIG, args(data_dir, run_dir, "--model.dim=32", "--train.steps=3"))).run()
    saved = sorted(p.name for p in (run_dir / "checkpoints" / "step-3").iterdir())
    code, err = finish(loom_train("--nproc", "2", *args(data_dir, run_dir)))
    assert code == 2
    line = error_line(err)
    # Every rank checks; the launcher reports whichever stopped first.
    assert re.match(r"error: rank [01]: run_dir ", line), line
    assert "holds a checkpoint of a different model" in line and "model.dim: checkpoint 32" in line
    assert sorted(p.name for p in (run_dir / "checkpoints" / "step-3").iterdir()) == saved
