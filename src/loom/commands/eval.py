"""`loom eval`: perplexity, multiple-choice and generation scores of a model. Its options are
the eval feature's EvalJob, which the pipeline's `[eval]` reads too."""

from __future__ import annotations

from loom.eval.evaluate import EvalJob as Options

DESCRIPTION = (
    "MODEL: a Loom run folder or checkpoint, an HF model folder or a .gguf file. "
    "TASK: a token-shard folder or a .txt/.jsonl text file (perplexity), a JSONL of "
    '{"context", "choices", "answer"} (multiple choice) or of {"prompt", "answer(s)"} '
    "(generation). A run folder's results are appended to its eval.jsonl."
)
__all__ = ["DESCRIPTION", "Options", "run"]


def run(options: Options) -> int:
    import json

    from loom.eval.evaluate import evaluate, render

    record, results = evaluate(options.model, options.tasks, options)
    print(json.dumps(record, indent=2) if options.json else render(results))
    return 0
