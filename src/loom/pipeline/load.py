"""Reading a pipeline file: every section loaded as its stage and validated (each stage's own
config validation included) before any work, then fingerprinted."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loom.core.config import read_with_overrides
from loom.core.errors import LoomError
from loom.pipeline.stage import Loading, Stage
from loom.pipeline.stages import STAGE_TYPES, STAGES
from loom.pipeline.state import fingerprint


@dataclass
class Pipeline:
    path: Path
    run_dir: Path
    stages: list[Stage]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)


def load_pipeline(
    path: str | Path, run_dir: str | None = None, overrides: Sequence[str] = ()
) -> Pipeline:
    """`overrides` as on every command line: `--pretrain.train.steps=50`."""
    path = Path(path)
    raw = read_with_overrides(path, overrides)
    known = ["run_dir", *STAGES]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise LoomError(
                f"{path}: unknown section or key {key!r}{hint} (known: {', '.join(known)})"
            )
    chosen = run_dir or raw.get("run_dir")
    if not chosen or not isinstance(chosen, str):
        raise LoomError(f'{path}: run_dir is not set; add run_dir = "..." or pass --run_dir=DIR')
    present = [s for s in STAGES if s in raw]
    if not present:
        raise LoomError(f"{path}: no stage sections; add at least one of {', '.join(STAGES)}")
    at = Loading(raw, path.resolve().parent, Path(chosen).resolve())
    for name in present:
        at.name = name
        try:
            stage = STAGE_TYPES[name].load(at)
        except LoomError as e:
            text = str(e)
            raise LoomError(text if text.startswith("[") else f"[{name}] {text}") from None
        at.earlier.append(stage)
    fingerprint(at.earlier)
    return Pipeline(path, at.root, at.earlier)
