"""Loom's layers, checked from the source: core, then the features, then orchestration.

Every `loom` import counts (module level, inside functions, under TYPE_CHECKING). A module may
import its own layer or lower ones; the package graph must have no cycle (within a layer too), so
each package can be read, tested and changed with only the ones below it in mind. A `__main__`
module is a script (`python -m loom.train`), run and never imported, so it is orchestration
wherever it lives.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

CORE, FEATURE, ORCHESTRATION = 0, 1, 2
LAYER_NAMES = {CORE: "core", FEATURE: "feature", ORCHESTRATION: "orchestration"}
PACKAGE_LAYERS = {
    "loom": CORE,  # the package itself: its version
    "core": CORE,
    **dict.fromkeys(
        ("data", "models", "parallel", "train", "finetune", "align", "planner", "eval", "serve"),
        FEATURE,
    ),
    **dict.fromkeys(
        ("commands", "pipeline", "report", "demo", "demo_finetune", "cli", "__main__"),
        ORCHESTRATION,
    ),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """The loom modules that `path` (module `name`) imports anywhere in its body, relative
    imports resolved."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            # `from loom.core import errors` imports the module loom.core.errors
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "loom" or m.startswith("loom.")}


def package_of(module: str) -> str:
    """The package a module belongs to: `loom.serve.engine` -> serve, `loom.cli` -> cli."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return "__main__"
    return parts[1] if len(parts) > 1 else "loom"


def source_graph() -> dict[str, set[str]]:
    """Each module under src/loom -> the loom modules it imports (that exist)."""
    modules = {module_name(p): p for p in sorted((SRC / "loom").rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for m in imports_of(path, name) if m in modules}
    return graph


def upward_imports(graph: Mapping[str, Iterable[str]], layers: Mapping[str, int]) -> list[str]:
    """One line per import of a higher layer (or of a package without a layer)."""
    problems = []
    for importer, imported in sorted((a, b) for a, bs in graph.items() for b in bs):
        src, dst = package_of(importer), package_of(imported)
        for package in (src, dst):
            if package not in layers:
                problems.append(f"{package} (from {importer}) has no layer: add it to the map")
        if src in layers and dst in layers and layers[dst] > layers[src]:
            problems.append(
                f"{importer} ({LAYER_NAMES[layers[src]]}) imports {imported} "
                f"({LAYER_NAMES[layers[dst]]})"
            )
    return sorted(set(problems))


def package_cycles(graph: Mapping[str, Iterable[str]], layers: Mapping[str, int]) -> list[str]:
    """The cycles of the package graph (packages with a layer), one strongly connected set per
    line with the module imports that close it."""
    edges: dict[str, dict[str, list[str]]] = {}
    for importer, imported_all in graph.items():
        for imported in imported_all:
            a, b = package_of(importer), package_of(imported)
            if a != b and a in layers and b in layers:
                edges.setdefault(a, {}).setdefault(b, []).append(f"{importer} -> {imported}")
    reach = {p: _reachable(p, edges) for p in edges}
    seen: set[str] = set()
    cycles = []
    for p in sorted(edges):
        if p in seen or p not in reach[p]:
            continue
        group = sorted(q for q in reach[p] if p in reach.get(q, set()))
        seen.update(group)
        links = sorted(
            link for a in group for b, ls in edges[a].items() if b in group for link in ls
        )
        cycles.append(f"{' <-> '.join(group)}: {'; '.join(links)}")
    return cycles


def _reachable(start: str, edges: Mapping[str, Mapping[str, list[str]]]) -> set[str]:
    found: set[str] = set()
    todo = list(edges.get(start, {}))
    while todo:
        p = todo.pop()
        if p not in found:
            found.add(p)
            todo.extend(edges.get(p, {}))
    return found


def test_no_module_imports_a_higher_layer() -> None:
    problems = upward_imports(source_graph(), PACKAGE_LAYERS)
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_the_packages_import_each_other_without_a_cycle() -> None:
    cycles = package_cycles(source_graph(), PACKAGE_LAYERS)
    assert not cycles, "cycles between packages:\n" + "\n".join(cycles)


def test_the_graph_covers_every_module() -> None:
    graph = source_graph()
    assert len(graph) == len(list((SRC / "loom").rglob("*.py")))
    assert "loom.core.errors" in graph["loom.cli"]


def test_imports_in_functions_type_checking_and_relative_ones_all_count(tmp_path: Path) -> None:
    module = tmp_path / "engine.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "import json\n"
        "from loom.core import errors\n"
        "if TYPE_CHECKING:\n"
        "    from loom.models.llama import Transformer\n"
        "def run():\n"
        "    import loom.cli\n"
        "    from .kv_cache import PagedCache\n"
        "    from ..train import trainer\n",
        encoding="utf-8",
    )
    found = imports_of(module, "loom.serve.engine")
    for name in (
        "loom.core.errors",
        "loom.models.llama",
        "loom.cli",
        "loom.serve.kv_cache",
        "loom.train.trainer",
    ):
        assert name in found
    assert "json" not in found


def test_the_detectors_catch_a_planted_upward_import_and_cycle() -> None:
    planted = {
        "loom.core.config": {"loom.models.llama"},  # core -> feature
        "loom.serve.engine": {"loom.cli", "loom.core.errors"},  # feature -> orchestration
        "loom.train.trainer": {"loom.eval.generate"},  # train -> eval -> data -> train
        "loom.eval.generate": {"loom.data.loader"},
        "loom.data.loader": {"loom.train.trainer"},
        "loom.models.llama": {"loom.core.errors"},
        "loom.cli": {"loom.serve.engine"},  # downward: fine
        "loom.quux.thing": set(),
        "loom.serve.api": {"loom.quux.thing"},  # a package without a layer
    }
    upward = upward_imports(planted, PACKAGE_LAYERS)
    assert upward == [
        "loom.core.config (core) imports loom.models.llama (feature)",
        "loom.serve.engine (feature) imports loom.cli (orchestration)",
        "quux (from loom.serve.api) has no layer: add it to the map",
    ]
    cycles = package_cycles(planted, PACKAGE_LAYERS)
    # the two upward imports close cycles too (cli <-> serve, core <-> models)
    assert [c.split(":")[0] for c in cycles] == [
        "cli <-> serve",
        "core <-> models",
        "data <-> eval <-> train",
    ]
    assert "loom.data.loader -> loom.train.trainer" in cycles[2]
    assert package_cycles({"loom.train.trainer": {"loom.eval.generate"}}, PACKAGE_LAYERS) == []
    # within orchestration too: a stage reading a command's options while `loom run` imports
    # the pipeline
    orchestration = {
        "loom.commands.run": {"loom.pipeline.run"},
        "loom.pipeline.stages.eval": {"loom.commands.eval"},
    }
    assert package_cycles(orchestration, PACKAGE_LAYERS) == [
        "commands <-> pipeline: loom.commands.run -> loom.pipeline.run; "
        "loom.pipeline.stages.eval -> loom.commands.eval"
    ]
