"""`loom data prepare`: clean, filter, deduplicate, mix and tokenize sources into shards."""

from __future__ import annotations

from dataclasses import dataclass

from loom.core.options import option

DESCRIPTION = "Run a data pipeline config; override any key as --section.key=value."
TAKES_OVERRIDES = True


@dataclass
class Options:
    config: str = option("", positional=True, metavar="CONFIG", help="TOML pipeline config")
    overrides: list[str] = option(cli=False, default_factory=list)


def run(options: Options) -> int:
    from loom.data.prepare import load_prepare_config, prepare

    prepare(load_prepare_config(options.config, options.overrides))
    return 0
