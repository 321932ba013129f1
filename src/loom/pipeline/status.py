"""`loom status RUN_DIR`: the stages of a pipeline run as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from loom.core.errors import LoomError
from loom.core.run_files import PIPELINE_STATE, RunFiles, StageRecord
from loom.pipeline.state import read_state
from loom.report import human_duration


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def figures_text(record: StageRecord) -> str:
    """A stage's key figures on one line."""
    figures = record.get("figures")
    if not isinstance(figures, dict):
        return ""
    return "; ".join(f"{k}: {_fmt(v)}" for k, v in figures.items())


def print_status(run_dir: str | Path) -> None:
    """A table of the stages in RUN_DIR/pipeline.json: status, duration, key figures."""
    run_dir = Path(run_dir)
    if not RunFiles(run_dir).pipeline_state.is_file():
        raise LoomError(
            f"{run_dir / PIPELINE_STATE} does not exist; give the run_dir of a `loom run` pipeline"
        )
    state = read_state(run_dir)
    colours = {"done": "green", "running": "blue", "failed": "red", "pending": "dim"}
    table = Table(title=f"pipeline {run_dir}")
    for column in ("stage", "status", "duration", "key figures"):
        table.add_column(column, overflow="fold")
    for s in state["stages"]:
        status = str(s.get("status", "?"))
        seconds = s.get("seconds")
        table.add_row(
            str(s.get("name", "?")),
            f"[{colours.get(status, 'white')}]{status}[/]",
            human_duration(float(seconds)) if isinstance(seconds, int | float) else "—",
            figures_text(s),
        )
    Console(width=max(120, Console().width)).print(table)
