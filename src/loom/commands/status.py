"""`loom status`: the stages of a pipeline run folder."""

from __future__ import annotations

from dataclasses import dataclass

from loom.core.options import option


@dataclass
class Options:
    run_dir: str = option(
        "", positional=True, metavar="RUN_DIR", help="a folder written by `loom run`"
    )


def run(options: Options) -> int:
    from loom.pipeline.status import print_status

    print_status(options.run_dir)
    return 0
