"""`[serve]`: `loom serve`'s options; the model defaults to the exported HF folder, else the
last training stage. It blocks until stopped, so it comes last and runs every time."""

from __future__ import annotations

from typing import Any, ClassVar

from loom.core.config import tree_from_dict
from loom.pipeline.sections import expand
from loom.pipeline.stage import BaseStage, Loading, model_source
from loom.serve.server import ServeJob, serve


class ServeStage(BaseStage):
    name: ClassVar[str] = "serve"
    repeats: ClassVar[bool] = True  # "done" only means it was stopped cleanly
    options: ServeJob

    @classmethod
    def load(cls, at: Loading) -> ServeStage:
        options = tree_from_dict(ServeJob, at.section)  # validated as it is built
        options.adapters = {
            k: expand(v, at.base, f"[serve] adapters.{k}") for k, v in options.adapters.items()
        }
        export = at.stage("export")
        if not options.model and export is not None and export.options.format == "hf":
            return cls(at.folder, options, ["export"], str(export.dir))
        model, inputs = model_source(at, options.model)
        return cls(at.folder, options, inputs, model)

    def run(self) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        serve(self.model, self.options)
        return {"model": self.model}
