"""`loom report`: a self-contained HTML report of a run, pipeline or data folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loom.core.options import option

DESCRIPTION = (
    "RUN_DIR: a training or fine-tuning run folder, a pipeline folder (pipeline.json) or "
    "a `loom data prepare` folder (manifest.json). Writes RUN_DIR/report.html (figures "
    "embedded) and prints its path."
)


@dataclass
class Options:
    run_dir: str = option("", positional=True, metavar="RUN_DIR")


def run(options: Options) -> int:
    from loom.report import write_report

    print(write_report(Path(options.run_dir)))
    return 0
