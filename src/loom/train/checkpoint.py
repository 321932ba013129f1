"""Checkpoints with `torch.distributed.checkpoint` (DCP), visible only once complete.

    checkpoints/step-<N>/        DCP files (model + optimizer, sharded and reshardable)
                   trainer.json  step, schedule, data position, model architecture, tokenizer
                   rng.pt        random-number-generator states
    checkpoints/latest           symlink to the newest complete step-<N>

A checkpoint is written into `step-<N>.tmp/`, renamed when every file is in place, and only
then does `latest` move (atomically), so a crash mid-write never leaves a `latest` that
cannot be loaded. Model and optimizer state are keyed by parameter name (the optimizer's
flattened, `state.<param>.<key>`), so a checkpoint saved under one parallel layout loads into
any other: each rank saves and loads only its own shards, DCP does the resharding. Rank 0
writes the small files and moves `latest`; every rank writes its shards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from loom.errors import LoomError
from loom.log import logger
from loom.parallel.distributed import barrier, rank

STATE_FILE = "trainer.json"
RNG_FILE = "rng.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@contextmanager
def _single_process_quiet() -> Iterator[None]:
    # DCP warns that it runs without a process group; on one process that is the intent.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


@contextmanager
def _loading(path: Path) -> Iterator[None]:
    """Turn whatever a damaged checkpoint makes DCP or torch.load raise into one clear error."""
    try:
        with _single_process_quiet():
            yield
    except LoomError:
        raise
    except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
        cause = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
        raise LoomError(
            f"checkpoint {path} could not be loaded ({cause[0].strip()}); "
            "delete it and point checkpoints/latest at an older step to resume from there"
        ) from e


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        """The checkpoint to resume from: `latest`, else the newest complete step folder."""
        link = self.dir / "latest"
        if link.exists() and not link.is_symlink():
            raise LoomError(f"{link} should be a link to a step folder; remove or replace it")
        if not link.is_symlink():
            complete = [p for _, p in self.steps() if is_complete(p)]
            if complete:
                logger.warning(
                    "%s is missing; using the newest complete checkpoint %s", link, complete[-1]
                )
            return complete[-1] if complete else None
        target = link.resolve()
        if not is_complete(target):
            raise LoomError(
                f"{link} points at {target}, which is not a complete checkpoint; "
                "remove the link to start over or point it at a complete step folder"
            )
        return target

    def save(
        self,
        step: int,
        parts: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        state: dict[str, Any],
    ) -> Path:
        final = self.dir / f"step-{step}"
        tmp = self.dir / f"step-{step}.tmp"
        if rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        model_sd, optim_sd = _state_dicts(parts, optimizers)
        with _single_process_quiet():
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        if rank() == 0:
            torch.save(_rng_state(), tmp / RNG_FILE)
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _point_latest(self.dir, final.name)
            self._prune(step)
            logger.debug("saved checkpoint %s", final)
        barrier()
        return final

    def load(
        self, path: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]
    ) -> dict[str, Any]:
        """Restore model, optimizer and RNG in place; return the trainer state."""
        # get_state_dict before dcp.load: the optimizer's state is created lazily.
        model_sd, optim_sd = _state_dicts(parts, optimizers)
        state = {"model": model_sd, "optim": optim_sd}
        with _loading(path):
            dcp.load(state, checkpoint_id=str(path))
            for part, optimizer in zip(parts, optimizers, strict=True):
                # Each part takes its own keys from the merged dicts; DCP already checked that
                # the checkpoint holds every key asked for.
                set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
                set_optimizer_state_dict(part, optimizer, state["optim"], options=_FLAT)
            _set_rng_state(torch.load(path / RNG_FILE, weights_only=False))
        return read_state(path)

    def steps(self) -> list[tuple[int, Path]]:
        """Step folders on disk, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(
            (int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_DIR.match(p.name))
        )

    def _prune(self, current: int) -> None:
        """Keep the newest `keep` checkpoints up to `current`. Folders of later steps (left by a
        run that was rolled back) are not counted and not touched: they are overwritten when
        training reaches their step again."""
        older = [path for step, path in self.steps() if step <= current]
        for path in older[: max(0, len(older) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)


_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _state_dicts(
    parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state of all parts on this rank, merged, keyed by parameter name."""
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    for part, optimizer in zip(parts, optimizers, strict=True):
        m, o = get_state_dict(part, optimizer, options=_FLAT)
        model_sd.update(m)
        optim_sd.update(o)
    return model_sd, optim_sd


def is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in (".metadata", STATE_FILE, RNG_FILE))


STATE_KEYS = ("step", "model", "tokenizer_hash", "data", "loader", "scheduler", "tokens_seen")


def read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise LoomError(f"checkpoint {path} has no readable {STATE_FILE}: {e}") from None
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else STATE_KEYS
    if missing:
        raise LoomError(
            f"checkpoint {path}: {STATE_FILE} lacks {', '.join(missing)}; it is damaged"
        )
    return state


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load only the model's weights from a checkpoint (for generation and evaluation)."""
    state = {"model": model.state_dict()}
    with _loading(path):
        dcp.load(state, checkpoint_id=str(path))
        model.load_state_dict(state["model"])


def _point_latest(directory: Path, target: str) -> None:
    tmp = directory / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, directory / "latest")


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
