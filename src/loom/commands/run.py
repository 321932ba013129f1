"""`loom run`: the stages of a pipeline TOML, resumable and idempotent (loom.pipeline)."""

from __future__ import annotations

from dataclasses import dataclass

from loom.core.options import option

DESCRIPTION = (
    "Run the stages of a pipeline TOML into <run_dir>/<stage>/; re-running skips "
    "stages that are done and unchanged and resumes an interrupted one. The planner's "
    "prediction for every training stage is printed first."
)
TAKES_OVERRIDES = True


@dataclass
class Options:
    pipeline: str = option("", positional=True, metavar="PIPELINE", help="pipeline TOML file")
    run_dir: str | None = option(
        None,
        flags=("--run_dir", "--run-dir"),
        metavar="DIR",
        help="the run folder (default: the pipeline's run_dir)",
    )
    dry_run: bool = option(
        False, help="validate, print the stages and the planner's predictions, run nothing"
    )
    overrides: list[str] = option(cli=False, default_factory=list)


def run(options: Options) -> int:
    from loom.pipeline.run import run_pipeline

    run_pipeline(
        options.pipeline, options.run_dir, dry_run=options.dry_run, overrides=options.overrides
    )
    return 0
