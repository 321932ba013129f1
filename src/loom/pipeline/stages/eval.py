"""`[eval]`: `loom eval`'s options; the model defaults to the last training stage and the tasks
to the data stage's shards (perplexity on its validation split)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, ClassVar

from loom.core.config import tree_from_dict
from loom.core.errors import LoomError
from loom.core.run_files import EVAL_LOG
from loom.eval.evaluate import EvalJob, evaluate, render
from loom.pipeline.sections import expand, need
from loom.pipeline.stage import BaseStage, Loading, model_source


class EvalStage(BaseStage):
    name: ClassVar[str] = "eval"
    options: EvalJob

    @classmethod
    def load(cls, at: Loading) -> EvalStage:
        options = tree_from_dict(EvalJob, at.section)
        model, inputs = model_source(at, options.model)
        if options.tasks:
            options.tasks = [expand(t, at.base, "[eval] tasks") for t in options.tasks]
            for task in options.tasks:
                if not Path(task).exists():
                    raise LoomError(f"[eval] tasks: {task} does not exist; fix the path")
        else:
            need("eval", "tasks", "data", "data" in at.raw)
            options.tasks = [str(at.root / "data")]
            inputs = ["data", *inputs]
        return cls(at.folder, options, inputs, model)

    def run(self) -> dict[str, Any]:
        c = self.options
        # The record goes to this stage's folder only: the evaluated stage's stays as it finished.
        record, results = evaluate(self.model, c.tasks, c, append_to_run=False)
        self.dir.mkdir(parents=True, exist_ok=True)
        logged = {**record, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (self.dir / EVAL_LOG).write_text(json.dumps(logged) + "\n")
        print(json.dumps(record, indent=2) if c.json else render(results))
        return {
            f"{r.name} {metric}": value
            for r in results
            for metric, value in r.metrics.items()
            if isinstance(value, int | float)
        }
