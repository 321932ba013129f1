"""Checkpoints with `torch.distributed.checkpoint` (DCP), visible only once complete.

    checkpoints/step-<N>/        DCP files (model + optimizer, sharded and reshardable)
                   trainer.json  step, schedule, data position, model architecture, tokenizer
                   rng.pt        random-number-generator states
                   checksums.json  bytes and XXH3-64 of every other file of the folder
    checkpoints/latest           symlink to the newest complete step-<N>
    checkpoints/suspect/step-<N>  checkpoints written after the last hardware check that
                                  passed, when a later one failed (never resumed from)

A checkpoint is written into `step-<N>.tmp/`, renamed when every file is in place, and only
then does `latest` move (atomically), so a crash mid-write never leaves a `latest` that
cannot be loaded. Model and optimizer state are keyed by parameter name (the optimizer's
flattened, `state.<param>.<key>`), so a checkpoint saved under one parallel layout loads into
any other: each rank saves and loads only its own shards, DCP does the resharding. Rank 0
writes the small files and moves `latest`; every rank writes its shards.

Before `latest` moves, the DCP metadata is read back and every byte range it lists is checked
to be on disk. At start-up the same check runs on `latest`, and every file is read once to
compare its XXH3-64 with `checksums.json` (DCP keeps no checksums, so a flipped bit in a shard
would otherwise load silently); a damaged or incomplete checkpoint is reported, naming the
file, and the newest older one that passes is used. Checkpoints written before
`checksums.json` existed get the first check only.

The digests are taken at save time by the rank that wrote each file, in parallel (see
`_ChecksummedWriter`), with xxhash's XXH3-64 through a memory map: 15.7 GB/s on one core of
the 2-core CPU machine against zlib's CRC-32 at 3.2 GB/s (measured side by side on 256 MB).
With CRC-32 the checksums took 13-30% of a synchronous save's time there (0.13-0.17 s per
512 MB a rank holds, writes landing in the page cache at 0.4-1 GB/s); XXH3 cuts that about
fivefold. With `checkpoint.async` it runs in the background write, off the training loop.
Reading the whole checkpoint at start-up is accepted (the 512 MB took 0.2 s with CRC-32
against dcp.load's 0.6-1 s): every rank checks before the process group
exists, so that they all pick the same checkpoint without talking; ranks on one machine share
the page cache, and the load that follows reads the same bytes again.

With `checkpoint.async = true` the state is staged into host memory and written by a
background thread (over a process group of its own, as DCP's async save needs on gloo); the
loop goes on training, and the checkpoint is committed (renamed, `latest` moved) at the first
step boundary after the write has finished everywhere.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.storage import WriteResult

from loom.core.distributed import barrier, rank
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.run_files import LATEST, RunFiles

STATE_FILE = "trainer.json"
RNG_FILE = "rng.pt"
CHECKSUMS_FILE = "checksums.json"
CHECKSUM_ALGORITHM = "xxh3_64"
_CHECKSUMS_PART = "checksums.part.json"  # one rank's digests, until the coordinator merges them
_STEP_DIR = re.compile(r"^step-(\d+)$")
SUSPECT = "suspect"


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
    def __init__(
        self,
        run_dir: Path,
        keep: int,
        async_save: bool = False,
        before_commit: Callable[[int], None] | None = None,
        trainable_only: bool = False,
    ) -> None:
        self.dir = RunFiles(Path(run_dir)).checkpoints
        # Adapter training: frozen base weights come from the base model, not the checkpoint.
        self.options = _TRAINABLE if trainable_only else _FLAT
        self.keep = keep
        self.async_save = async_save
        self.before_commit = before_commit  # fault injection hook (loom.train.resilience)
        self._pending: _Pending | None = None
        self._group: Any = None

    def latest(self) -> Path | None:
        """The checkpoint to resume from: what `latest` points at if it is whole, else the
        newest older step folder that is (each one skipped is reported)."""
        link = self.dir / LATEST
        if link.exists() and not link.is_symlink():
            raise LoomError(f"{link} should be a link to a step folder; remove or replace it")
        problems = []
        for path in self.candidates():
            problem = verify(path)
            if problem is None:
                if problems or not link.is_symlink():
                    logger.warning("resuming from %s, the newest complete checkpoint", path)
                return path
            problems.append(f"{path.name}: {problem}")
            logger.warning("checkpoint %s is not usable (%s); trying an older one", path, problem)
        if problems:
            raise LoomError(
                f"{self.dir} holds no usable checkpoint ({'; '.join(problems)}); move the "
                "folder away to start the run over"
            )
        return None

    def candidates(self) -> list[Path]:
        """Step folders to resume from, best first: `latest`'s target, then the others newest
        first (a later folder not pointed at is one whose commit never finished)."""
        link = self.dir / LATEST
        target = link.resolve() if link.is_symlink() else None
        newest_first = [p for s, p in reversed(self.steps())]
        if target is None:
            return newest_first
        limit = _step_of(target)
        return [target, *(p for p in newest_first if p != target and _step_of(p) < limit)]

    def save(
        self,
        step: int,
        parts: list[nn.Module],
        optimizers: list[torch.optim.Optimizer],
        state: dict[str, Any],
    ) -> None:
        """Write (or with async, start writing) the checkpoint of `step`."""
        self.finish(wait=True)  # one checkpoint in flight at a time
        tmp = self.dir / f"step-{step}.tmp"
        if rank() == 0:
            for unfinished in self.dir.glob("step-*.tmp"):  # left by a crash mid-write
                shutil.rmtree(unfinished, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(_rng_state(), tmp / RNG_FILE)
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
        barrier()
        if optimizers:
            model_sd, optim_sd = _state_dicts(parts, optimizers, self.options)
            sd = {"model": model_sd, "optim": optim_sd}
        else:  # weights only (an imported model): what `load_model_weights` reads
            sd = {"model": {k: v for part in parts for k, v in part.state_dict().items()}}
        if self.async_save:
            if self._group is None and dist.is_initialized():
                self._group = dist.new_group(backend="gloo")
            with _single_process_quiet():
                future = dcp.async_save(
                    sd, storage_writer=_ChecksummedWriter(tmp), process_group=self._group
                )
            self._pending = _Pending(step, tmp, future)
            return
        with _single_process_quiet():
            dcp.save(sd, storage_writer=_ChecksummedWriter(tmp))
        self._commit(step, tmp)
        barrier()

    def finish(self, wait: bool) -> bool:
        """Commit the checkpoint being written in the background once its write is done
        everywhere (at once, or waiting for it with `wait`); True when nothing is pending."""
        pending = self._pending
        if pending is None:
            return True
        if not wait and not pending.future.done():
            return False
        self._pending = None
        try:
            pending.future.result()
        except BaseException as e:  # CheckpointException is a BaseException
            raise LoomError(f"writing checkpoint {pending.tmp} failed: {e}") from e
        # Rank 0's write finishes last: DCP writes the metadata there after every rank's shards.
        self._commit(pending.step, pending.tmp)
        return True

    def _commit(self, step: int, tmp: Path) -> None:
        if self.before_commit is not None:
            self.before_commit(step)
        if rank() != 0:
            return
        # Sizes only: the digests were just taken from these files by the ranks that wrote them.
        problem = verify(tmp, digests=False)
        if problem is not None:
            raise LoomError(f"checkpoint {tmp} did not verify after writing: {problem}")
        final = self.dir / f"step-{step}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _point_latest(self.dir, final.name)
        self._prune(step)
        logger.debug("saved checkpoint %s", final)

    def load(
        self, path: Path, parts: list[nn.Module], optimizers: list[torch.optim.Optimizer]
    ) -> dict[str, Any]:
        """Restore model, optimizer and RNG in place; return the trainer state."""
        # get_state_dict before dcp.load: the optimizer's state is created lazily.
        model_sd, optim_sd = _state_dicts(parts, optimizers, self.options)
        state = {"model": model_sd, "optim": optim_sd}
        with _loading(path):
            dcp.load(state, checkpoint_id=str(path))
            for part, optimizer in zip(parts, optimizers, strict=True):
                # Each part takes its own keys from the merged dicts; DCP already checked that
                # the checkpoint holds every key asked for.
                set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
                set_optimizer_state_dict(part, optimizer, state["optim"], options=self.options)
            _set_rng_state(torch.load(path / RNG_FILE, weights_only=False))
        return read_state(path)

    def steps(self) -> list[tuple[int, Path]]:
        """Step folders on disk, oldest first."""
        if not self.dir.is_dir():
            return []
        return sorted(
            (int(m.group(1)), p) for p in self.dir.iterdir() if (m := _STEP_DIR.match(p.name))
        )

    def quarantine(self, after_step: int) -> None:
        """Rank 0: move the step folders after `after_step` to `suspect/`, so that a resume
        starts from one written before; `latest` then points at the newest one left (or is
        removed)."""
        if rank() != 0:
            return
        for step, path in self.steps():
            if step > after_step:
                target = self.dir / SUSPECT / path.name
                target.parent.mkdir(exist_ok=True)
                shutil.rmtree(target, ignore_errors=True)  # left by an earlier quarantine
                os.replace(path, target)
        left = self.steps()
        if left:
            _point_latest(self.dir, left[-1][1].name)
        else:
            (self.dir / LATEST).unlink(missing_ok=True)

    def suspects(self, after_step: int) -> list[Path]:
        """The quarantined step folders of steps after `after_step`, oldest first."""
        folder = self.dir / SUSPECT
        found = folder.iterdir() if folder.is_dir() else iter(())
        return sorted((p for p in found if _step_of(p) > after_step), key=_step_of)

    def _prune(self, current: int) -> None:
        """Keep the newest `keep` checkpoints up to `current`. Folders of later steps (left by a
        run that was rolled back) are not counted and not touched: they are overwritten when
        training reaches their step again."""
        older = [path for step, path in self.steps() if step <= current]
        for path in older[: max(0, len(older) - self.keep)]:
            shutil.rmtree(path, ignore_errors=True)


_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
_TRAINABLE = StateDictOptions(flatten_optimizer_state_dict=True, ignore_frozen_params=True)


def _state_dicts(
    parts: list[nn.Module], optimizers: list[torch.optim.Optimizer], options: StateDictOptions
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model and optimizer state of all parts on this rank, merged, keyed by parameter name."""
    model_sd: dict[str, Any] = {}
    optim_sd: dict[str, Any] = {}
    for part, optimizer in zip(parts, optimizers, strict=True):
        m, o = get_state_dict(part, optimizer, options=options)
        model_sd.update(m)
        optim_sd.update(o)
    return model_sd, optim_sd


@dataclass
class _Pending:
    step: int
    tmp: Path
    future: Future[Any]


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def verify(path: Path, digests: bool = True) -> str | None:
    """What is wrong with the checkpoint folder `path`, or None when it is whole: its small
    files are readable, every byte range DCP's metadata lists is on disk and, where the folder
    has `checksums.json`, every file it lists has its recorded size and (with `digests`, which
    reads every file once) its recorded XXH3-64."""
    if not path.is_dir():
        return "no such folder"
    for name in (".metadata", STATE_FILE, RNG_FILE):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as e:
        return f"its .metadata is unreadable ({type(e).__name__})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = info.offset + info.length
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, end in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size < end:
            return f"{name} is truncated ({file.stat().st_size} of {end} bytes)"
    if (path / CHECKSUMS_FILE).exists():
        problem = _check_sums(path, digests)
        if problem is not None:
            return problem
    try:
        read_state(path)
    except LoomError as e:
        return str(e)
    return None


def _check_sums(path: Path, digests: bool) -> str | None:
    """What `checksums.json` says is wrong with the files of `path`, or None."""
    try:
        listed = json.loads((path / CHECKSUMS_FILE).read_text())
        files = {name: (int(f["bytes"]), f["algorithm"], f["digest"]) for name, f in listed.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        return f"its {CHECKSUMS_FILE} is unreadable ({type(e).__name__})"
    for name, (size, algorithm, digest) in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} when it was written"
        if algorithm != CHECKSUM_ALGORITHM:
            return (
                f"{CHECKSUMS_FILE} gives {name} a {algorithm} digest, which this version of "
                f"Loom cannot check; resume it with the version that wrote it"
            )
        if digests and (actual := file_checksum(file)["digest"]) != digest:
            return (
                f"{name} is corrupt: its XXH3-64 is {actual}, {digest} when it was written "
                "(its size is unchanged, so bytes were altered on disk or in transfer)"
            )
    return None


def file_checksum(path: Path) -> dict[str, Any]:
    """Size and XXH3-64 of the file at `path`, as `checksums.json` records them. Through a
    memory map: no copy, so the hash's own speed (read() in chunks is about half of it)."""
    with path.open("rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:  # an empty file cannot be mapped
            digest = xxhash.xxh3_64(b"").hexdigest()
        else:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as view:
                digest = xxhash.xxh3_64(view).hexdigest()
    return {"bytes": size, "algorithm": CHECKSUM_ALGORITHM, "digest": digest}


class _ChecksummedWriter(FileSystemWriter):
    """DCP's file writer, plus `checksums.json`: the size and XXH3-64 of every file.

    Each rank checksums the shard files it has just written (read back while they are in the
    page cache; no rank reads another's) into a part file beside them. DCP calls `finish` on
    the coordinator only after every rank's `write_data` has returned, so all parts are on disk
    then: it merges them with the digests of its own files (`.metadata`, `trainer.json`,
    `rng.pt`) into one `checksums.json` before the save returns, i.e. before the folder is
    renamed and `latest` moves. Part files rather than a collective of our own: DCP's gather
    is already the meeting point, and the same code serves the async save, whose write runs
    on a background thread over its own process group while ranks commit at their own pace.
    """

    def write_data(
        self, plan: SavePlan, planner: SavePlanner
    ) -> torch.futures.Future[list[WriteResult]]:
        future = super().write_data(plan, planner)  # already done: the write is synchronous
        written = sorted({result.storage_data.relative_path for result in future.wait()})
        sums = {name: file_checksum(Path(self.path) / name) for name in written}
        part = Path(self.path) / f"{plan.storage_data.prefix}{_CHECKSUMS_PART}"
        _write_synced(part, json.dumps(sums))
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        super().finish(metadata, results)
        folder = Path(self.path)
        parts = sorted(folder.glob(f"*{_CHECKSUMS_PART}"))
        sums: dict[str, Any] = {}
        for part in parts:
            sums.update(json.loads(part.read_text()))
        shards = {result.storage_data.relative_path for rank in results for result in rank}
        if not shards <= sums.keys():
            missing = ", ".join(sorted(shards - sums.keys()))
            raise LoomError(
                f"checkpoint {folder}: no checksum for {missing} (the part file of the rank that "
                "wrote it is not visible on rank 0), so it is not committed; put checkpoints on "
                "a file system that every rank shares"
            )
        for file in sorted(folder.iterdir()):
            if file.is_file() and file not in parts and file.name not in sums:
                sums[file.name] = file_checksum(file)
        _write_synced(folder / CHECKSUMS_FILE, json.dumps(dict(sorted(sums.items())), indent=1))
        for part in parts:
            part.unlink()


def _write_synced(path: Path, text: str) -> None:
    """Write `path` and fsync it, as DCP does with its own files."""
    with path.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


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


def load_model_weights(path: Path, model: nn.Module, trainable_only: bool = False) -> None:
    """Load only the model's weights from a checkpoint (for generation and evaluation);
    `trainable_only`: just the parameters that train (an adapter checkpoint holds no others)."""
    if trainable_only:
        weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if not weights:
            raise LoomError(f"loading {path}: the model has no trainable weights to load")
    else:
        weights = model.state_dict()
    state = {"model": weights}
    with _loading(path):
        dcp.load(state, checkpoint_id=str(path))
        model.load_state_dict(state["model"], strict=not trainable_only)


def _point_latest(directory: Path, target: str) -> None:
    tmp = directory / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, directory / LATEST)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
