"""`loom run`: validate and predict everything, then run, skip or resume each stage in order,
keeping `pipeline.json` current so a killed pipeline resumes where it stopped."""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.run_files import PipelineState, StageRecord
from loom.pipeline.load import Pipeline, load_pipeline
from loom.pipeline.predict import describe_plan, predict
from loom.pipeline.stage import Stage
from loom.pipeline.stages.training import HardwareSection, TrainingStage
from loom.pipeline.state import read_state, write_state
from loom.pipeline.status import figures_text
from loom.report import human_duration, write_report

SKIP = "done, unchanged (skip)"


def run_pipeline(
    path: str | Path,
    run_dir: str | None = None,
    dry_run: bool = False,
    overrides: Sequence[str] = (),
) -> Path:
    """Validate, predict, then run (or skip/resume) every stage; returns the run folder."""
    pipe = load_pipeline(path, run_dir, overrides)
    training = [s for s in pipe.stages if isinstance(s, TrainingStage)]
    plans = {s.name: predict(s, pipe.stages) for s in training}
    previous: dict[str | None, StageRecord] = {
        s.get("name"): s for s in read_state(pipe.run_dir)["stages"] if isinstance(s, dict)
    }
    print(f"pipeline {pipe.path} → {pipe.run_dir}")
    to_run = []
    for stage in pipe.stages:
        what = _what_to_do(stage, previous.get(stage.name, {}))
        print(f"  {stage.name:<10} {what}")
        if what != SKIP:
            to_run.append(stage)
    for name, plan in plans.items():
        print("  " + describe_plan(name, plan))
    if dry_run:
        print("dry run: nothing was run")
        return pipe.run_dir
    for stage in to_run:
        if isinstance(stage, TrainingStage) and stage.hardware is not None:
            check_hardware_here(stage.name, stage.hardware)
    pipe.run_dir.mkdir(parents=True, exist_ok=True)
    records = [_record(stage, previous.get(stage.name, {})) for stage in pipe.stages]
    state: PipelineState = {"stages": records, "plan": plans}
    write_state(pipe.run_dir, state)
    for stage, record in zip(pipe.stages, records, strict=True):
        run_stage(pipe, stage, record, state)
    print(f"report: {write_report(pipe.run_dir)}")
    return pipe.run_dir


def _done(stage: Stage, record: StageRecord) -> bool:
    return record.get("status") == "done" and stage.dir.is_dir() and not stage.repeats


def _what_to_do(stage: Stage, old: StageRecord) -> str:
    if old.get("fingerprint") != stage.fingerprint:
        return "run"
    if _done(stage, old):
        return SKIP
    return "resume" if old.get("status") in ("running", "failed") else "run"


def _record(stage: Stage, old: StageRecord) -> StageRecord:
    """The stage's line in pipeline.json: the old one's status and figures while its
    fingerprint is unchanged, else pending."""
    keep = old.get("fingerprint") == stage.fingerprint
    return {
        "name": stage.name,
        "status": old.get("status", "pending") if keep else "pending",
        "seconds": old.get("seconds") if keep else None,
        "dir": stage.name,
        "fingerprint": stage.fingerprint,
        "figures": old.get("figures", {}) if keep else {},
    }


def local_gpus() -> list[str]:
    """The names of this machine's CUDA devices (none on a CPU-only machine)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def check_hardware_here(name: str, target: HardwareSection) -> None:
    """Refuse to start a stage meant for other hardware: its prediction, layout and batch are
    the target's."""
    gpus = local_gpus()
    family = target.planner(name).name.split("-")[0]  # h100-pcie -> h100; "cpu"/"custom" kept
    matching = [g for g in gpus if family in g.lower().replace(" ", "-")]
    have = (
        "no GPU" if not gpus else ", ".join(f"{gpus.count(g)} × {g}" for g in dict.fromkeys(gpus))
    )
    fix = f"run it there, or remove [{name}.hardware] to run here"
    if target.nodes > 1 or len(matching) < target.gpus:
        raise LoomError(
            f"[{name}] hardware asks for {target.words()}; this machine has {have}; {fix}"
        )


def run_stage(pipe: Pipeline, stage: Stage, record: StageRecord, state: PipelineState) -> None:
    """Skip a done stage, resume a resumable one that was killed or failed, else run it from
    an empty folder; its record is saved before and after."""
    if _done(stage, record):
        logger.info("stage %s: skipped (done, config and inputs unchanged)", stage.name)
        return
    resume = record["status"] in ("running", "failed") and stage.resumable
    if resume and stage.dir.is_dir():
        logger.info("stage %s: resuming in %s", stage.name, stage.dir)
        spent = float(record["seconds"] or 0.0)
    else:
        if stage.dir.exists():
            logger.info("stage %s: config or inputs changed; clearing %s", stage.name, stage.dir)
            shutil.rmtree(stage.dir)
        spent = 0.0
    logger.info("stage %s: running", stage.name)
    record.update(status="running", seconds=spent or None, figures={})
    write_state(pipe.run_dir, state)
    started = time.perf_counter()
    try:
        record["figures"] = stage.run()
    except BaseException:
        record.update(status="failed", seconds=round(spent + time.perf_counter() - started, 3))
        write_state(pipe.run_dir, state)
        raise
    record.update(status="done", seconds=round(spent + time.perf_counter() - started, 3))
    write_state(pipe.run_dir, state)
    took = human_duration(record["seconds"])
    logger.info("stage %s: done in %s; %s", stage.name, took, figures_text(record))
