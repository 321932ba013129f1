"""`loom data inspect`: the funnel of a prepared folder."""

from __future__ import annotations

from dataclasses import dataclass

from loom.core.options import option


@dataclass
class Options:
    out: str = option(
        "", positional=True, metavar="OUT", help="a folder written by `loom data prepare`"
    )


def run(options: Options) -> int:
    from loom.data.inspect import print_funnel

    print_funnel(options.out)
    return 0
