"""`<run_dir>/pipeline.json`: each stage's status, duration, figures and fingerprint; and the
fingerprints themselves (a stage's resolved options and the fingerprints of its inputs)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from loom.core.errors import LoomError
from loom.core.run_files import PipelineState, RunFiles, write_atomic
from loom.pipeline.stage import Stage


def read_state(run_dir: Path) -> PipelineState:
    path = RunFiles(run_dir).pipeline_state
    if not path.is_file():
        return {"stages": [], "plan": {}}
    try:
        state: PipelineState = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LoomError(
            f"{path} is unreadable ({e}); delete it to start the pipeline over"
        ) from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), list):
        raise LoomError(f"{path} has no 'stages' list; delete it to start the pipeline over")
    return state


def write_state(run_dir: Path, state: PipelineState) -> None:
    write_atomic(RunFiles(run_dir).pipeline_state, json.dumps(state, indent=2))


def fingerprint(stages: Sequence[Stage]) -> None:
    """Set each stage's fingerprint: the sha256 of its resolved options (absolute paths) and of
    its inputs' fingerprints, so a change reruns the stage and everything that reads it."""
    done: dict[str, str] = {}
    for stage in stages:
        blob = json.dumps(
            {"config": stage.identity(), "inputs": {n: done[n] for n in stage.inputs}},
            sort_keys=True,
            default=str,
        )
        stage.fingerprint = hashlib.sha256(blob.encode()).hexdigest()
        done[stage.name] = stage.fingerprint
