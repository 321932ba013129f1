"""The run folder's names and records (loom.core.run_files): a record written through its type
reads back equal with the keys of the contract, and a real run writes no top-level name that
run_files does not define (so a new literal file name cannot sneak in)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from loom.core.run_files import (
    NAMES,
    GoodputRecord,
    MetricsLine,
    PipelineState,
    RunFiles,
)
from loom.pipeline.state import read_state, write_state
from loom.report import write_report
from loom.train.metrics import MetricsWriter, read_metrics
from loom.train.resilience import GoodputLedger
from loom.train.trainer import train

GOODPUT_KEYS = [  # goodput.json as written before run_files existed, in its order
    "path",
    "started",
    "last_seen",
    "attempts",
    "high_water",
    "productive_s",
    "recomputed_s",
    "recomputed_steps",
    "checkpoint_s",
    "setup_s",
    "restarts_s",
    "skipped_steps",
    "rollbacks",
    "goodput",
    "wall_s",
    "restarts",
    "other_s",
]


def test_the_goodput_ledger_reads_back_what_it_wrote(tmp_path: Path) -> None:
    ledger = GoodputLedger.open(tmp_path, process_start=time.time() - 5.0)
    ledger.training_started()
    ledger.step_done(1, 0.5)
    ledger.step_done(2, 0.5)
    ledger.step_done(2, 0.25)  # done again: recomputed
    ledger.checkpoint_stall(0.125)
    ledger.skipped_steps, ledger.rollbacks = 1, 1
    ledger.save()
    text = RunFiles(tmp_path).goodput.read_text()
    assert list(json.loads(text)) == GOODPUT_KEYS
    read = GoodputRecord.from_json(text)
    assert read == ledger.record()
    assert read.summary() == ledger.summary()
    assert (read.high_water, read.recomputed_steps, read.recomputed_s) == (2, 1, 0.25)
    parts = sum(getattr(read, key) for key, _ in GoodputRecord.parts())
    assert abs(parts - read.wall_s) < 1e-6  # the parts the report draws add up to the wall time

    again = GoodputLedger.open(tmp_path, process_start=time.time())
    assert (again.attempts, again.high_water, again.productive_s) == (2, 2, 1.0)


def test_metrics_lines_read_back_equal(tmp_path: Path) -> None:
    lines: list[MetricsLine] = [
        {
            "step": step,
            "loss": 2.5 / step,
            "lr": 1e-3,
            "grad_norm": 0.75,
            "tokens_per_s": 1234.5,
            "mfu": 0.25,
            "peak_mem_gib": 0.5,
            "peak_mem_gib_per_rank": [0.5, 0.25],
        }
        for step in (1, 2, 3)
    ]
    writer = MetricsWriter(tmp_path, tensorboard=False, resume_step=0)
    for line in lines:
        writer.write(line)
    writer.close()
    assert read_metrics(tmp_path) == lines
    MetricsWriter(tmp_path, tensorboard=False, resume_step=2).close()  # a resume trims
    assert read_metrics(tmp_path) == lines[:2]


def test_the_pipeline_state_reads_back_equal(tmp_path: Path) -> None:
    state: PipelineState = {
        "stages": [
            {
                "name": "pretrain",
                "status": "done",
                "seconds": 12.5,
                "dir": "pretrain",
                "fingerprint": "abc",
                "figures": {"steps": 8, "final_loss": 3.25},
            }
        ],
        "plan": {"pretrain": {"step_time_s": 0.5}},
    }
    write_state(tmp_path, state)
    assert [p.name for p in tmp_path.iterdir()] == [RunFiles(tmp_path).pipeline_state.name]
    assert read_state(tmp_path) == state


def test_a_run_writes_only_names_that_run_files_defines(
    tiny_config: Callable[..., object], tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train(tiny_config("--train.eval_interval=4", "--metrics.sample_log=true"))
    write_report(run)
    written = {p.name for p in run.iterdir()}
    assert written <= NAMES, f"not in loom.core.run_files: {sorted(written - NAMES)}"
    files = RunFiles(run)
    for path in (files.config, files.metrics, files.goodput, files.report, files.samples(0)):
        assert path.is_file(), path
    for path in (files.tensorboard, files.checkpoints, files.tokenizer):
        assert path.is_dir(), path
