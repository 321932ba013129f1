"""Run several training jobs, one after another, in one torchrun launch (a launch costs seconds).

    torchrun --standalone --nproc-per-node N tests/run_layouts.py SPEC.json OUT_DIR

SPEC is a list of jobs: {"name", "args": [--section.key=value ...], "resume_from": optional
{"run_dir", "step"}}. A job with `resume_from` starts from a copy of that run folder rolled back
to `step`. Each rank writes OUT_DIR/<name>.rank<R>.json with the logged losses and the bytes of
parameters and optimizer state it holds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from loom.core import distributed
from loom.core.config import load_config
from loom.train.trainer import Trainer


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def local_rows(tensor: torch.Tensor) -> int:
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).shape[0]


def held_bytes(trainer: Trainer) -> dict[str, int]:
    """Local bytes of weights, optimizer state and (after one more forward/backward) gradients."""
    params = [p for part in trainer.model.parts for p in part.parameters()]
    trainer.forward_backward()
    grads = [p.grad for p in params if p.grad is not None]
    state = [
        value
        for optimizer in trainer.optimizers.optimizers
        for per_param in optimizer.state.values()
        for key, value in per_param.items()
        if key != "step"
    ]
    return {
        "params": sum(local_bytes(p) for p in params),
        "grads": sum(local_bytes(g) for g in grads),
        "optimizer": sum(local_bytes(v) for v in state),
    }


def launch(nproc: int, spec: list[dict[str, Any]], out: Path) -> dict[str, dict[int, Any]]:
    """Run `spec` in one torchrun launch of `nproc` ranks; returns {job name: {rank: record}}."""
    spec_file = out / f"spec{nproc}.json"
    spec_file.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", __file__, str(spec_file), str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    records: dict[str, dict[int, Any]] = {}
    for job in spec:
        for path in out.glob(f"{job['name']}.rank*.json"):
            rank = int(path.name.split(".")[1].removeprefix("rank"))
            records.setdefault(job["name"], {})[rank] = json.loads(path.read_text())
    return records


def roll_back(source: Path, target: Path, step: int) -> None:
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target, symlinks=True)
    checkpoints = target / "checkpoints"
    for folder in checkpoints.glob("step-*"):
        if int(folder.name.split("-")[1]) > step:
            shutil.rmtree(folder)
    (checkpoints / "latest").unlink()
    (checkpoints / "latest").symlink_to(f"step-{step}")


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    distributed.init_process_group(torch.device("cpu"), timeout_s=300)
    for job in spec:
        cfg = load_config(None, job["args"])
        if "resume_from" in job and distributed.rank() == 0:
            roll_back(
                Path(job["resume_from"]["run_dir"]), Path(cfg.run_dir), job["resume_from"]["step"]
            )
        distributed.barrier()
        trainer = Trainer(cfg)
        result = trainer.run()
        record = {
            "losses": {str(k): v for k, v in result.train_losses.items()},
            "val_losses": {str(k): v for k, v in result.val_losses.items()},
            "bytes": held_bytes(trainer),
            "layout": trainer.layout,
            "experts": [  # each MoE layer's experts: which module runs them, how many here
                (type(m).__name__, local_rows(m.down_proj))
                for n, m in trainer.model.parts[0].named_modules()
                if n.endswith("mlp.experts")
            ],
        }
        (out / f"{job['name']}.rank{distributed.rank()}.json").write_text(json.dumps(record))
        distributed.barrier()
    distributed.shutdown()


if __name__ == "__main__":
    main()
