"""`loom eval`: perplexity, multiple-choice and generation scores of a model. The pipeline's
`[eval]` reads the same Options (`model` and `tasks` default to earlier stages there)."""

from __future__ import annotations

from dataclasses import dataclass

from loom.commands.options import option
from loom.core.errors import LoomError
from loom.eval.evaluate import EvalOptions

DESCRIPTION = (
    "MODEL: a Loom run folder or checkpoint, an HF model folder or a .gguf file. "
    "TASK: a token-shard folder or a .txt/.jsonl text file (perplexity), a JSONL of "
    '{"context", "choices", "answer"} (multiple choice) or of {"prompt", "answer(s)"} '
    "(generation). A run folder's results are appended to its eval.jsonl."
)


@dataclass
class Options(EvalOptions):
    """EvalOptions (the scoring knobs, defaults and help there) plus what to score."""

    model: str = option("", positional=True, metavar="MODEL")
    tasks: list[str] = option(nargs="+", required=True, metavar="TASK", default_factory=list)
    json: bool = option(False, help="print one JSON object, not a table")

    def __post_init__(self) -> None:
        if self.quantize not in (None, "int8"):
            raise LoomError(f'quantize = {self.quantize!r}: use "int8" or leave it out')


def run(options: Options) -> int:
    import json

    from loom.eval.evaluate import evaluate, render

    record, results = evaluate(options.model, options.tasks, options)
    print(json.dumps(record, indent=2) if options.json else render(results))
    return 0
