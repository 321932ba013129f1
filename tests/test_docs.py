"""The pages in docs/: every command has one, its synopsis matches `--help`, its links resolve,
and its ```console examples run and print what the page says (convention: docs/README.md)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from conftest import free_port

from loom.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
COMMAND_TIMEOUT_S = 120
EXIT_MARKER = re.compile(r"\s*#\s*exit\s+(\d+)\s*$")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every leaf command by page name: `train`, `data-prepare`, `tokenizer-train`, ..."""

    def leaves(parser: argparse.ArgumentParser, prefix: str) -> dict[str, argparse.ArgumentParser]:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            return {prefix: parser}
        out: dict[str, argparse.ArgumentParser] = {}
        for name, sub in subs[0].choices.items():
            out.update(leaves(sub, f"{prefix}-{name}" if prefix else name))
        return out

    return leaves(build_parser(), "")


def console_blocks(text: str) -> list[list[str]]:
    """The lines of each ```console block, in page order."""
    blocks = re.findall(r"^```console\n(.*?)^```", text, flags=re.S | re.M)
    return [block.splitlines() for block in blocks]


def parse_steps(lines: list[str]) -> list[tuple[str, int, list[str]]]:
    """(command, expected exit status, expected fragments) for each `$ ` line of a block."""
    steps: list[tuple[str, int, list[str]]] = []
    for line in lines:
        if line.startswith("$ "):
            steps.append((line[2:], 0, []))
        elif line.startswith("> ") or line == ">":
            assert steps and not steps[-1][2], f"continuation line out of place: {line!r}"
            steps[-1] = (steps[-1][0] + "\n" + line[2:], 0, [])
        elif line.strip() and line.strip() != "...":
            assert steps, f"output before the first command: {line!r}"
            steps[-1][2].append(line.strip())
    out = []
    for command, _, fragments in steps:
        marker = EXIT_MARKER.search(command.splitlines()[-1])
        out.append((command, int(marker.group(1)) if marker else 0, fragments))
    return out


def page_env() -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        STDLIB=sysconfig.get_paths()["stdlib"],
        LOOM_REPO=str(REPO),
        PORT=str(free_port()),
        COLUMNS="160",
        NO_COLOR="1",
        TERM="dumb",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    return env


def github_anchors(markdown: Path) -> set[str]:
    """The anchors GitHub gives the headings of a markdown file."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.*)$", markdown.read_text(), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_console_convention() -> None:
    """Commands, `> ` continuations, `# exit N`, fragments and `...` parse as documented."""
    block = ["$ cat > a <<'EOF'", "> x", ">", "> EOF", "$ false  # exit 1", "...", "  err  ", ""]
    assert parse_steps(block) == [
        ("cat > a <<'EOF'\nx\n\nEOF", 0, []),
        ("false  # exit 1", 1, ["err"]),
    ]


def test_every_command_has_a_page_and_every_page_a_command() -> None:
    commands = set(command_parsers())
    pages = {name.removesuffix(".md") for name in PAGES} - {"README"}
    assert commands - pages == set(), "commands without a page in docs/"
    assert pages - commands == set(), "pages in docs/ for no command"
    index = (DOCS / "README.md").read_text()
    for name in sorted(commands):
        assert f"({name}.md)" in index, f"docs/README.md does not link {name}.md"


@pytest.mark.parametrize("name", sorted(command_parsers()))
def test_synopsis_matches_help(name: str) -> None:
    """A page quotes its command's usage line as argparse prints it (any line wrapping)."""
    usage = " ".join(command_parsers()[name].format_usage().split())
    assert usage in " ".join((DOCS / f"{name}.md").read_text().split())


@pytest.mark.parametrize("page", PAGES)
def test_links_resolve(page: str) -> None:
    path = DOCS / page
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        assert resolved.exists(), f"{page}: broken link {target}"
        if anchor and resolved.suffix == ".md":
            assert anchor in github_anchors(resolved), f"{page}: no heading for {target}"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if p != "README.md"])
def test_examples_run(page: str, tmp_path: Path) -> None:
    """Each `$ ` command runs with bash in one folder per page; its output holds the fragments."""
    steps = [s for block in console_blocks((DOCS / page).read_text()) for s in parse_steps(block)]
    assert steps, f"{page} has no runnable example"
    env = page_env()
    groups: list[int] = []
    started = time.monotonic()
    try:
        for command, status, fragments in steps:
            proc = subprocess.Popen(
                ["bash", "-o", "pipefail", "-c", command],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            groups.append(proc.pid)
            try:
                output, _ = proc.communicate(timeout=COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail(f"{page}: `{command}` ran over {COMMAND_TIMEOUT_S} s")
            where = f"{page}: `{command}` printed:\n{output[-4000:]}"
            assert proc.returncode == status, f"exit {proc.returncode}, expected {status}. {where}"
            position = 0
            for fragment in fragments:
                found = output.find(fragment, position)
                assert found >= 0, f"missing (in order) {fragment!r}. {where}"
                position = found + len(fragment)
    finally:
        for group in groups:  # whatever an example left running in the background
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
    print(f"{page}: {time.monotonic() - started:.1f} s")
