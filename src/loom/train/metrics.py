"""Run metrics: `metrics.jsonl` (one object per logged step), TensorBoard, peak memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loom.core.device import process_memory_bytes
from loom.core.log import logger
from loom.core.run_files import MetricsLine, RunFiles, metrics_line_json


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated tensor memory on a GPU; peak resident memory of the process on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return process_memory_bytes() / 2**30


class MetricsWriter:
    """Appends records to `metrics.jsonl` and TensorBoard; on resume, drops records past `step`.

    Trimming on resume keeps one record per step even when a crashed run had logged steps
    beyond its last checkpoint.
    """

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int) -> None:
        self.run_dir = run_dir
        self.tensorboard = tensorboard
        self.path = RunFiles(run_dir).metrics
        self._open(resume_step)

    def _open(self, resume_step: int) -> None:
        _trim(self.path, resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(
                str(RunFiles(self.run_dir).tensorboard), purge_step=resume_step + 1
            )

    def rewind(self, step: int) -> None:
        """After a rollback to `step`: drop the records of the steps that will be redone."""
        self.close()
        self._open(step)

    def write(self, record: MetricsLine) -> None:
        self._file.write(metrics_line_json(record))
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(_tb_tag(key), value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[MetricsLine]:
    path = RunFiles(Path(run_dir)).metrics
    if not path.exists():
        return []
    records: list[MetricsLine] = []
    torn = 0
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn += bool(line.strip())  # a line cut short by a crash mid-write
    if torn:
        logger.warning("skipped %d unreadable line(s) in %s", torn, path)
    return records


def _trim(path: Path, resume_step: int) -> None:
    if not path.exists():
        return
    records = read_metrics(path.parent)
    kept = [r for r in records if r.get("step", 0) <= resume_step]
    dropped = len(records) - len(kept)
    if dropped:
        logger.info("dropped %d metric record(s) logged after step %d", dropped, resume_step)
    path.write_text("".join(metrics_line_json(r) for r in kept))


def _tb_tag(key: str) -> str:
    group = "val" if key.startswith("val_") else "train"
    return f"{group}/{key}"
