"""Loom's single logger: rich output on a terminal, plain timestamped lines otherwise."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("loom")


def is_terminal() -> bool:
    return sys.stderr.isatty()


def setup_logging(debug: bool = False, quiet: bool = False) -> None:
    """Configure the `loom` logger once; later calls only change the level.

    `quiet` (ranks other than 0 of a parallel run) keeps warnings and errors only."""
    level = logging.WARNING if quiet else logging.DEBUG if debug else logging.INFO
    logger.setLevel(level)
    if logger.handlers:
        return
    if is_terminal():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=debug)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
