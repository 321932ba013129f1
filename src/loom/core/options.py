"""Options dataclasses whose fields are also command-line flags: a field's default, type and
help are written once, and `loom <cmd>`, the pipeline's sections and the features read the
same class (the flags themselves are generated in loom.commands.options)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

_NO_DEFAULT: Any = dataclasses.MISSING


def option(
    default: Any = _NO_DEFAULT,
    *,
    help: str | None = None,
    flags: Sequence[str] = (),
    metavar: str | None = None,
    choices: Sequence[str] | None = None,
    nargs: str | None = None,
    required: bool = False,
    positional: bool = False,
    append: bool = False,
    cli: bool = True,
    convert: Callable[[Any], Any] | None = None,
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field that is also a flag (`--field-name` unless `flags` names it)."""
    metadata = {
        "help": help,
        "flags": tuple(flags),
        "metavar": metavar,
        "choices": tuple(choices) if choices else None,
        "nargs": nargs,
        "required": required,
        "positional": positional,
        "append": append,
        "cli": cli,
        "convert": convert,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flags_of(cls: type) -> list[dataclasses.Field[Any]]:
    """The fields of `cls` that are command-line flags or positionals."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)]
