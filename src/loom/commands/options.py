"""Command-line flags generated from an `Options` dataclass (loom.core.options), so each option
is written once: its default, type and help live on the field."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

from loom.core.options import flags_of

T = TypeVar("T")


def _scalar(tp: Any) -> Any:
    """`int | None` -> int; list[str] -> str."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) in (list, dict):
        tp = str
    return tp


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One argparse argument per field of the Options class `cls`."""
    hints = typing.get_type_hints(cls)
    for f in flags_of(cls):
        m = f.metadata
        tp = _scalar(hints[f.name])
        kwargs: dict[str, Any] = {"help": m.get("help")}
        for key in ("metavar", "choices", "nargs"):
            if m.get(key) is not None:
                kwargs[key] = list(m[key]) if key == "choices" else m[key]
        if m.get("positional"):
            parser.add_argument(f.name, **kwargs)
            continue
        names = m.get("flags") or (f"--{f.name.replace('_', '-')}",)
        if tp is bool:  # on by default: --flag / --no-flag
            kwargs["action"] = argparse.BooleanOptionalAction if f.default else "store_true"
        else:
            if tp is not str:
                kwargs["type"] = tp
            if m.get("append"):  # repeated flag: a list however the field stores it
                kwargs["action"] = "append"
        if m.get("required"):
            kwargs["required"] = True
        elif f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        elif m.get("append"):
            kwargs["default"] = []
        elif f.default_factory is not dataclasses.MISSING:
            kwargs["default"] = f.default_factory()
        parser.add_argument(*names, dest=f.name, **kwargs)


def from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """The Options instance for parsed `args` (its `__post_init__` validates it)."""
    values: dict[str, Any] = {}
    for f in flags_of(cls):
        value = getattr(args, f.name)
        convert = f.metadata.get("convert")
        values[f.name] = convert(value) if convert is not None else value
    return cls(**values, **extra)


def join_overrides(extra: list[str]) -> list[str]:
    """Accept `--train.steps 200` as well as `--train.steps=200`."""
    joined: list[str] = []
    i = 0
    while i < len(extra):
        item = extra[i]
        pair = item.startswith("--") and "=" not in item and i + 1 < len(extra)
        if pair and not extra[i + 1].startswith("--"):
            joined.append(f"{item}={extra[i + 1]}")
            i += 2
        else:
            joined.append(item)
            i += 1
    return joined
