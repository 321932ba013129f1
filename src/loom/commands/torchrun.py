"""`loom torchrun`: torchrun's own arguments, with restarts that work on gloo."""

from __future__ import annotations

from dataclasses import dataclass

from loom.core.options import option

DESCRIPTION = (
    "The arguments of torchrun, e.g. `loom torchrun --nnodes 2 "
    "--nproc-per-node 8 --max-restarts 3 --rdzv-backend c10d --rdzv-endpoint HOST:29500 "
    "-m loom.train CONFIG`."
)
ADD_HELP = False  # every argument, --help included, is torchrun's


@dataclass
class Options:
    args: list[str] = option(cli=False, default_factory=list)


def run(options: Options) -> int:
    from loom.parallel.launch import torchrun

    return torchrun(options.args)
