"""What every stage is: the `Stage` protocol, the base its dataclasses share, and what loading
a stage may look at (the pipeline file, the run folder, the stages before it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

from loom.core.errors import LoomError
from loom.pipeline.sections import expand, need, table


class Stage(Protocol):
    """A stage of `loom run`: loaded and validated from its section before any work, then run
    into its own folder."""

    name: ClassVar[str]
    resumable: ClassVar[bool]  # a killed or failed run continues in its folder (else starts over)
    repeats: ClassVar[bool]  # runs even when done and unchanged (serve: it blocks until stopped)
    dir: Path  # absolute: <run_dir>/<name>
    options: Any  # the command's options (or config tree) the section was read into
    inputs: list[str]  # the stages it reads from; their fingerprints are part of its own
    fingerprint: str

    @classmethod
    def load(cls, at: Loading) -> Self:
        """The section as a stage, validated, its paths absolute and its inputs found."""
        ...

    def identity(self) -> Any:
        """The resolved options as JSON data: with the inputs, what the fingerprint covers."""
        ...

    def run(self) -> dict[str, Any]:
        """Do the work into `dir`; return the stage's key figures."""
        ...


@dataclass
class Loading:
    """What loading a stage sees: the whole pipeline file and the stages loaded before it."""

    raw: dict[str, Any]  # the pipeline file, overrides applied
    base: Path  # the pipeline file's folder: relative paths start there
    root: Path  # the run folder
    name: str = ""  # the stage being loaded
    earlier: list[Stage] = field(default_factory=list)

    @property
    def section(self) -> dict[str, Any]:
        """A copy of the stage's own section."""
        return table(self.raw, self.name)

    @property
    def folder(self) -> Path:
        return self.root / self.name

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.earlier if s.name == name), None)

    @property
    def last_training(self) -> Stage | None:
        return next(
            (s for s in reversed(self.earlier) if s.name in ("pretrain", "finetune", "align")), None
        )


@dataclass
class BaseStage:
    """The fields and defaults every stage dataclass shares."""

    name: ClassVar[str]
    resumable: ClassVar[bool] = False
    repeats: ClassVar[bool] = False
    dir: Path
    options: Any
    inputs: list[str] = field(default_factory=list)
    model: str = ""  # eval/export/serve: the model folder
    fingerprint: str = ""

    def identity(self) -> Any:
        return {"config": dataclasses.asdict(self.options), "model": self.model}


def model_source(at: Loading, given: str) -> tuple[str, list[str]]:
    """eval/export/serve's model: `given` (made absolute) or the last training stage's folder;
    (the model folder, the stages it comes from)."""
    if given:
        model = expand(given, at.base, f"[{at.name}] model")
        if not Path(model).exists():
            raise LoomError(f"[{at.name}] model = {given!r}: {model} does not exist")
        return model, []
    trained = at.last_training
    need(at.name, "model", "pretrain", trained is not None)
    assert trained is not None
    return str(trained.dir), [trained.name]
