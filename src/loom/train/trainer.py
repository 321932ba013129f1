"""The training loop: validate, set up the run folder, train, evaluate, checkpoint.

One process, or one of the ranks torchrun started (the layout in `[parallel]`). Everything
that could be wrong with the input (layout, data, vocabulary, an existing run folder of a
different model) is checked before the run folder is touched or any compute is spent. Every
rank reads the same global stream of samples and takes its data-parallel share; only rank 0
writes logs, metrics and the run folder's small files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.distributed.device_mesh import DeviceMesh

from loom.core import distributed
from loom.core.checkpoint import SUSPECT, Checkpointer, read_state
from loom.core.config import Config, config_to_dict
from loom.core.device import select_device
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.run_files import MetricsLine, RankNote, RunFiles
from loom.models.moe import RoutingStats
from loom.parallel.dims import resolve
from loom.parallel.parallelize import ParallelModel
from loom.planner.hardware import peak_at_least, peak_flops
from loom.planner.training import auto_layout, check_fits, local_hardware, predicted_memory
from loom.train.health import Needs, checkpoint_bytes, preflight, recheck, refusal
from loom.train.metrics import MetricsWriter, peak_memory_gib
from loom.train.optim import Optimizers
from loom.train.progress import Progress, log_goodput
from loom.train.resilience import (
    FaultInjector,
    GoodputLedger,
    StepGuard,
    StopSignal,
    Watchdog,
    parse_faults,
    process_start_time,
    restart_attempt,
)
from loom.train.stragglers import Node, StepClock, StragglerDetector, gather_times, hostnames
from loom.train.task import TrainTask, pretraining

T = TypeVar("T")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    train_losses: dict[int, float] = field(default_factory=dict)
    val_losses: dict[int, float] = field(default_factory=dict)
    tokens_per_s: float = 0.0
    stopped_by: str | None = None  # the signal that stopped the run before train.steps
    goodput: dict[str, float | int] = field(default_factory=dict)


def check_resumable(
    checkpoint: Path, cfg: Config, data: list[str], tokenizer: str
) -> dict[str, Any]:
    """Refuse to resume a checkpoint made for another model, sequence length, tokenizer or data."""
    state = read_state(checkpoint)
    saved, current = state.get("model", {}), cfg.model.architecture()
    diffs = [
        f"model.{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
        for k, v in current.items()
        if saved.get(k) != v
    ]
    run_dir = checkpoint.parent.parent
    if diffs:
        raise LoomError(
            f"run_dir {run_dir} holds a checkpoint of a different model ({'; '.join(diffs)}); "
            "choose a new run_dir or restore the model settings"
        )
    saved_seq = state.get("loader", {}).get("seq_len")
    if saved_seq != cfg.train.seq_len:
        raise LoomError(
            f"run_dir {run_dir} was trained with train.seq_len={saved_seq}; its data position "
            f"cannot continue with train.seq_len={cfg.train.seq_len} "
            f"(keep {saved_seq} or use a new run_dir)"
        )
    if state["tokenizer_hash"] != tokenizer:
        raise LoomError(
            f"run_dir {run_dir} was trained with another tokenizer than the one of the data given "
            f"now; use data tokenized with the run's tokenizer ({run_dir}/tokenizer) "
            "or a new run_dir"
        )
    if state["data"] != data:
        raise LoomError(
            f"run_dir {run_dir} was trained on other data than the data given now; resume with "
            "the same data.path / data.mix, or start a new run_dir"
        )
    return state


class Trainer:
    """Runs a `TrainTask` (pretraining unless told otherwise); see loom.train.task."""

    def __init__(self, cfg: Config, task: TrainTask | None = None) -> None:
        self.cfg = cfg
        self.task = task or pretraining()
        resume_state = self._check_input()
        # Input is valid: from here on the run folder is written.
        mesh = self._start_run()
        self._preflight()
        self.model: ParallelModel = self.task.build_model(self, mesh)
        moe = cfg.model.moe.enabled
        self.routing = RoutingStats(self.model.parts, cfg.model.n_layers) if moe else None
        self.optimizers = Optimizers(
            self.model.parts, self.cfg.optimizer, self.cfg.train.steps, self.cfg.memory
        )
        if resume_state is not None:
            self._resume(resume_state)
        self.health_passed = self.step  # the last step a hardware check vouched for
        self._measure()

    def _check_input(self) -> dict[str, Any] | None:
        """Everything that could be wrong with the input, before any file is written; returns
        the state of the checkpoint to resume, if any."""
        cfg, t = self.cfg, self.cfg.train
        if not cfg.run_dir:
            raise LoomError(
                'run_dir is not set; add run_dir = "..." to the config or pass --run_dir=DIR'
            )
        self.run_dir = Path(cfg.run_dir)
        self.process_start = process_start_time()
        parse_faults(os.environ.get("LOOM_FAULTS", ""))  # a bad spec fails before any work
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise LoomError(f"run_dir {self.run_dir} is a file; choose a folder")
        data = self.task.open_data(cfg)
        self.loader, self.val = data.loader, data.val
        self.data_identity, self.tokenizer_hash = data.identity, data.tokenizer_hash
        self.tokenizer_dir = data.tokenizer_dir
        self.device = select_device(t.device)
        if (
            t.precision == "bf16"
            and self.device.type == "cuda"
            and not torch.cuda.is_bf16_supported()
        ):
            raise LoomError(
                "train.precision=bf16 is not supported by this GPU; use train.precision=fp32"
            )
        self._check_layout()
        self.checkpointer = Checkpointer(
            self.run_dir,
            self.cfg.checkpoint.keep,
            async_save=self.cfg.checkpoint.async_,
            trainable_only=self.task.trainable_only,
        )
        self.resume_from = self.checkpointer.latest()
        if self.resume_from is None:
            return None
        state = check_resumable(self.resume_from, self.cfg, self.data_identity, self.tokenizer_hash)
        self.task.check_resume(state, self.run_dir)
        return state

    def _check_layout(self) -> None:
        """The process layout (chosen by the planner with parallel.auto) and that it fits."""
        cfg = self.cfg
        self.distributed = distributed.launched_by_torchrun()
        self.processes = int(os.environ["WORLD_SIZE"]) if self.distributed else 1
        if cfg.parallel.auto:
            cfg = self.cfg = auto_layout(cfg, self.processes, self.device)
        self.dims = resolve(cfg, self.processes)
        check_fits(cfg, self.dims, self.device, force=cfg.train.force, **self.task.planner_strategy)
        if not self.distributed and cfg.memory.offload == "params":
            raise LoomError(
                "memory.offload=params works through FSDP, which needs a process group; "
                "launch with `loom train CONFIG --nproc N` (N may be 1)"
            )

    def _start_run(self) -> DeviceMesh | None:
        """The process group, the step counters and the run folder's small files."""
        self.rank = 0
        mesh = None
        if self.distributed:
            distributed.init_process_group(self.device, self.cfg.parallel.timeout_s)
            self.rank = distributed.rank()
            mesh = self.dims.build_mesh(self.device.type)
            _warn_if_restarts_will_fail(self.rank)
        self.step = 0
        self.tokens_seen = 0
        self.batches = 0  # global batches drawn from the loader (skipped ones included)
        self.skip_batches: set[int] = set()  # batches a rollback ruled out
        self.injector = FaultInjector(self.rank)
        self.clock = StepClock(self.device)
        self.compute_s = 0.0  # the last step's compute, less any injected slowness
        r = self.cfg.resilience
        self.stragglers: StragglerDetector | None = None
        if self.distributed and r.straggler_factor:
            self.stragglers = StragglerDetector(
                r.straggler_factor, r.straggler_intervals, hostnames(), log=self.rank == 0
            )
        self.excluded: list[int] = []  # straggler ranks whose node leaves the job
        self.node = Node.of_this_process()
        if r.straggler_action == "exclude" and self.node.count < 2 and self.rank == 0:
            logger.warning(
                "resilience.straggler_action=exclude needs several nodes (this job has one): "
                "stragglers are only logged"
            )
        self.checkpointer.before_commit = self.injector.in_checkpoint
        self.guard = StepGuard(self.cfg.resilience)
        self._report_progress()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.task.save_config(self.cfg, self.run_dir)
            tokenizer = RunFiles(self.run_dir).tokenizer
            shutil.copytree(self.tokenizer_dir, tokenizer, dirs_exist_ok=True)
        return mesh

    def _preflight(self) -> None:
        """Hardware health before anything is built (loom.train.health): a device computing
        wrong results, a failing GPU or a corrupting link stops the run here, named."""
        if not self.cfg.resilience.preflight:
            return
        hw = local_hardware(self.device, self.dims.world_size)
        memory = predicted_memory(self.cfg, self.dims, hw, **self.task.planner_strategy)
        needs = Needs(
            memory.total,
            checkpoint_bytes(self.cfg.model.num_params()),
            self.cfg.checkpoint.keep + 1,  # the kept ones and the one being written
        )
        corrupt = self.injector.due("sdc", 0)
        self._guarded(
            lambda: preflight(self.device, self._check_dtype, self.run_dir, needs, corrupt),
            "the pre-flight health check",
        )

    @property
    def _check_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.cfg.train.precision == "bf16" else torch.float32

    def _health_check(self) -> None:
        """Every `resilience.health_interval` steps, before the step's checkpoint, the device
        checks again. A device that fails may have computed wrong results since the last check
        that passed, so the checkpoints written after it go to checkpoints/suspect/ and every
        rank stops, naming the device; the launcher's restart then resumes from an older one
        (after a pre-flight check that refuses the same device)."""
        interval = self.cfg.resilience.health_interval
        if not interval or self.step % interval:
            return
        corrupt = self.injector.due("sdc", self.step)
        failed = self._guarded(
            lambda: recheck(self.device, self._check_dtype, self.run_dir, self.step, corrupt),
            f"the health check after step {self.step}",
        )
        if not failed:
            self.health_passed = self.step
            return
        self._guarded(
            lambda: self.checkpointer.finish(wait=True), f"the checkpoint before step {self.step}"
        )
        distributed.barrier()
        self.checkpointer.quarantine(self.health_passed)
        distributed.barrier()
        suspects = [p.name for p in self.checkpointer.suspects(self.health_passed)]
        resume = self.checkpointer.steps()
        raise LoomError(
            f"health check after step {self.step} failed on {refusal(failed)}; checkpoints "
            f"written after step {self.health_passed} (the last check that passed), "
            f"{', '.join(suspects) or 'none'}, are in {self.checkpointer.dir / SUSPECT}: they may "
            "hold the device's wrong results; the same command resumes from "
            + (resume[-1][1].name if resume else "the start")
        )

    def _resume(self, state: dict[str, Any]) -> None:
        assert self.resume_from is not None
        self._restore(self.resume_from)
        seed = self.cfg.train.seed
        if state["loader"]["seed"] != seed:
            logger.warning(
                "train.seed=%d differs from the run's seed %d; the data order continues with "
                "the run's seed",
                seed,
                state["loader"]["seed"],
            )
        logger.info("resumed from %s (step %d)", self.resume_from, self.step)

    def _measure(self) -> None:
        """The peak FLOP/s of all processes and the FLOPs per token, the two sides of MFU."""
        cfg = self.cfg
        self.peak_flops, peak_source = peak_flops(self.device, cfg.train.precision)
        self.peak_flops *= self.processes
        self.flops_per_token = self.task.flops_per_token(self)
        logger.info(
            "model %s: %.2fM parameters, %.3g FLOPs/token; layout %s; peak %.3g FLOP/s (%s)",
            cfg.model.preset,
            cfg.model.num_params() / 1e6,
            self.flops_per_token,
            self.layout,
            self.peak_flops,
            peak_source,
        )

    def _raise_peak_to(self, achieved: float) -> None:
        """A step faster than the peak proves the peak mis-measured (a noisy moment on a shared
        CPU): measure again, so MFU is never reported against a peak below a real step."""
        if achieved > self.peak_flops > 0:
            n = self.processes
            per_process = peak_at_least(
                self.device, self.cfg.train.precision, achieved / n, self.peak_flops / n
            )
            self.peak_flops = per_process * n

    def _restore(self, path: Path) -> None:
        """Model, optimizer, schedule, RNG and data position from the checkpoint at `path`."""
        state = read_state(path)
        self.checkpointer.load(path, self.model.parts, self.optimizers.optimizers)
        self.optimizers.resume(state["scheduler"], self.cfg.optimizer)
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.batches = int(state.get("batches", self.step))
        self.skip_batches |= set(state.get("skip_batches", []))

    @property
    def layout(self) -> str:
        d = self.dims
        if d.world_size == 1:
            return "1 process"
        named = {"pp": d.pp, "dp_replicate": d.dp_replicate, "dp_shard": d.dp_shard}
        named |= {"cp": d.cp, "tp": d.tp}
        layout = " × ".join(f"{k} {v}" for k, v in named.items() if v > 1)
        return f"{layout} (experts over ep {d.ep})" if d.ep > 1 else layout

    def _report_progress(self) -> None:
        """Under torchrun, note this rank's pid and step where the launcher can find them, so
        that a rank that dies or hangs is reported with the step it was in."""
        if not self.distributed:
            return
        path = RunFiles(self.run_dir).rank_note(self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        note: RankNote = {"pid": os.getpid(), "step": self.step + 1}
        path.write_text(json.dumps(note))

    # -- one optimizer step -------------------------------------------------------------------

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One optimizer step; returns the mean loss, the gradient norm and the lr it used.
        A step whose loss or gradients are not finite (or a loss spike, if so configured)
        leaves the model and optimizer untouched."""
        loss = self.forward_backward()
        if self.injector.due("nan", self.step + 1):
            loss = loss * math.nan
            for part in self.model.parts:
                for p in part.parameters():
                    if p.grad is not None:
                        p.grad.mul_(math.nan)
        clip = self.cfg.optimizer.grad_clip or math.inf
        grad_norm = self.model.clip_grad_norm_(clip)
        lr = self.optimizers.lr
        if self.guard.check(self.step + 1, loss.item(), grad_norm.item()) is None:
            self.optimizers.step()
            if self.routing is not None:
                self.routing.update_balance_bias()
        else:
            self.optimizers.zero_grad()
        return loss, grad_norm, lr

    def forward_backward(self) -> torch.Tensor:
        """Accumulate gradients over the micro-batches of one batch; returns the mean loss
        (over the whole global batch, the same on every rank)."""
        t = self.cfg.train
        micro = t.micro_batch_size or t.batch_size
        accum = t.grad_accum_steps
        for part in self.model.parts:
            part.train()
        while self.batches in self.skip_batches:  # ruled out by a rollback: pass over it
            for _ in range(accum):
                self.loader.next_indices(micro)
            self.batches += 1
        loss_sum: torch.Tensor | None = None
        shares = []
        if self.routing is not None:
            self.routing.reset()
        for _ in range(accum):
            with self.clock.data_wait():
                share = self.loader.next_share(micro, self.model.dp_rank, self.dims.dp)
                shares.append(share)
                batch = [x.to(self.device, non_blocking=True) for x in self.loader.batch(share)]
            loss = self.task.micro_step(self, batch, 1.0 / accum)
            if loss is not None:
                loss_sum = loss if loss_sum is None else loss_sum + loss
        self.batches += 1
        self.tokens_seen += t.batch_size * t.seq_len
        if self.cfg.metrics.sample_log:
            self._log_samples(shares)
        mean = loss_sum / accum if loss_sum is not None else None
        return self.model.global_mean(mean)

    def _log_samples(self, shares: list[Any]) -> None:
        path = RunFiles(self.run_dir).samples(self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "step": self.step + 1,
            "attempt": restart_attempt(),
            "samples": [pair.tolist() for share in shares for pair in share],
        }
        with path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")

    def save_checkpoint(self) -> None:
        state = {
            "model": self.cfg.model.architecture(),
            "model_preset": self.cfg.model.preset,
            "tokenizer_hash": self.tokenizer_hash,
            "data": self.data_identity,
            "loader": self.loader.state_dict(),
            "scheduler": self.optimizers.scheduler_state(),
            "tokens_seen": self.tokens_seen,
            "batches": self.batches,
            "skip_batches": sorted(self.skip_batches),
            "layout": self.layout,
            "config": config_to_dict(self.cfg),
            **self.task.checkpoint_state(),
        }
        return self.checkpointer.save(
            self.step, self.model.parts, self.optimizers.optimizers, state
        )

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        result = TrainResult(self.run_dir, self.step)
        self.task.start(self, result)
        if self.step >= self.cfg.train.steps:
            logger.info(
                "run %s is already at step %d of %d; nothing to do",
                self.run_dir,
                self.step,
                self.cfg.train.steps,
            )
        else:
            self._loop(result)
        result.step = self.step
        self.task.finish(self, result)
        return result

    def _loop(self, result: TrainResult) -> None:
        loop = _Loop.open(self, result)
        try:
            with StopSignal() as stop:
                while self.step < self.cfg.train.steps:
                    loop.watchdog.arm(f"rank {self.rank}: step {self.step + 1}")
                    if self._iteration(loop, stop):
                        break
                loop.watchdog.arm(f"rank {self.rank}: writing the last checkpoint")
                self._last_checkpoint(loop)
                if self.excluded:
                    self._exclude_stragglers()
        finally:
            loop.close()  # a hang never gets here: the watchdog exits the process first

    def _iteration(self, loop: _Loop, stop: StopSignal) -> bool:
        """One step, then its record and checkpoint; true when a signal stops the run."""
        self._report_progress()
        step_start = time.perf_counter()
        self.clock.start_step()
        self.injector.at_step_start(self.step + 1)
        slowed = self.injector.slow_down(self.step + 1, self.compute_s, self.clock.compute_clock)
        loss, grad_norm, lr = self._guarded(self.train_step, f"in step {self.step + 1}")
        self.compute_s = self.clock.end_step() - slowed
        self.step += 1
        loop.interval_tokens += self.cfg.train.batch_size * self.cfg.train.seq_len
        if self._guard(loop):
            return False
        step_seconds = self._log(loop, step_start, loss, grad_norm, lr)
        if loop.ledger is not None:
            loop.ledger.step_done(self.step, step_seconds)
        self._health_check()
        stopping = self._checkpoint(loop, stop)
        loop.watchdog.disarm()
        if stopping:
            received = stop.received
            loop.result.stopped_by = (
                signal.Signals(received).name if received else "a signal to a peer"
            )
        return stopping

    def _guard(self, loop: _Loop) -> bool:
        """After too many bad steps in a row: roll back (true), and rewind what was logged."""
        if not self.guard.rollback_due:
            return False
        self._guarded(self._rollback, f"rolling back after step {self.step}")
        if loop.metrics is not None:
            loop.metrics.rewind(self.step)
        loop.progress.rewind(self.step)
        loop.watchdog.disarm()
        return True

    def _log(
        self, loop: _Loop, step_start: float, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float
    ) -> float:
        """The metrics record of this step, when one is due; returns the step's seconds."""
        t, last = self.cfg.train, self.step == self.cfg.train.steps
        do_eval = bool(self.val) and (
            last or (t.eval_interval and self.step % t.eval_interval == 0)
        )
        if not (do_eval or last or self.step % self.cfg.metrics.log_interval == 0):
            return time.perf_counter() - step_start
        loss_value = loss.item()  # synchronises the device before timing
        step_seconds = time.perf_counter() - step_start
        tokens_per_s = loop.interval_tokens / (time.perf_counter() - loop.interval_start)
        self._raise_peak_to(self.flops_per_token * tokens_per_s)
        record = self._record(loop, loss_value, grad_norm.item(), lr, tokens_per_s)
        if do_eval:
            record["val_loss"] = self._guarded(self.evaluate, f"evaluating after step {self.step}")
            loop.result.val_losses[self.step] = record["val_loss"]
        record.update(self.task.metrics(self))
        if self.routing is not None:
            record.update(self.routing.metrics())
        if loop.metrics is not None:
            loop.metrics.write(record)
        loop.progress.update(record)
        loop.result.train_losses[self.step] = loss_value
        loop.result.tokens_per_s = tokens_per_s
        loop.interval_start, loop.interval_tokens = time.perf_counter(), 0
        return step_seconds

    def _record(
        self, loop: _Loop, loss: float, grad_norm: float, lr: float, tokens_per_s: float
    ) -> MetricsLine:
        per_rank = self._guarded(
            lambda: distributed.per_rank(peak_memory_gib(self.device)),
            f"logging step {self.step}",
        )
        record: MetricsLine = {
            "step": self.step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / self.peak_flops
            if self.peak_flops
            else 0.0,
            "peak_mem_gib": max(per_rank),
            "tokens": self.tokens_seen,
            "skipped_steps": self.guard.skipped,
        }
        if len(per_rank) > 1:
            record["peak_mem_gib_per_rank"] = per_rank
        if self.stragglers is not None:
            own_s, data_s = self.clock.take()
            times = self._guarded(
                lambda: gather_times(own_s, data_s, self.device), f"logging step {self.step}"
            )
            verdict = self.stragglers.observe(*times)
            record["rank_own_s_median"] = verdict.median_s
            record["slowest_rank"] = verdict.slowest_rank
            record["slowest_ratio"] = verdict.slowest_ratio
            record["straggler_ranks"] = verdict.stragglers
            if self.cfg.resilience.straggler_action == "exclude" and self.node.count > 1:
                self.excluded = verdict.stragglers
        if loop.ledger is not None:
            record["goodput"] = loop.ledger.goodput
            record["checkpoint_s"] = loop.ledger.checkpoint_s
        return record

    def evaluate(self) -> float:
        """The task's validation loss (pretraining: over the first `eval_batches`)."""
        return self.task.evaluate(self)

    def _checkpoint(self, loop: _Loop, stop: StopSignal) -> bool:
        """Commit the previous checkpoint, save one when due; true when a signal stops the run."""
        cfg = self.cfg.checkpoint
        stopping, time_due = self._agree(
            stop.received is not None or bool(self.excluded),
            bool(cfg.interval_minutes)
            and time.monotonic() - loop.last_save >= 60 * cfg.interval_minutes,
        )
        save_start = time.perf_counter()
        self._guarded(
            lambda: self.checkpointer.finish(wait=False),
            f"committing a checkpoint after step {self.step}",
        )
        periodic = time_due or self.step % cfg.interval == 0
        last = self.step == self.cfg.train.steps
        # Not in the middle of a run of bad steps: a rollback must land before it.
        if last or stopping or (periodic and not self.guard.consecutive):
            self._guarded(self.save_checkpoint, f"saving the checkpoint of step {self.step}")
            loop.last_save = time.monotonic()
        if loop.ledger is not None:
            loop.ledger.checkpoint_stall(time.perf_counter() - save_start)
            loop.ledger.skipped_steps = self.guard.skipped
            loop.ledger.rollbacks = self.guard.rollbacks
            loop.ledger.save()
        return stopping

    def _last_checkpoint(self, loop: _Loop) -> None:
        """Wait for the last checkpoint's commit; the goodput summary."""
        save_start = time.perf_counter()
        self._guarded(lambda: self.checkpointer.finish(wait=True), "writing the last checkpoint")
        distributed.barrier()
        if loop.ledger is not None:
            loop.ledger.checkpoint_stall(time.perf_counter() - save_start)
            loop.ledger.save()
            loop.result.goodput = loop.ledger.summary()
            log_goodput(loop.result.goodput)

    def _exclude_stragglers(self) -> None:
        """After the checkpoint: the stragglers' nodes stop their agents (SIGTERM, so they
        leave the job), and every rank fails, so that the other agents restart without them."""
        nodes = sorted({self.node.of_rank(r) for r in self.excluded})
        hosts = self.stragglers.host if self.stragglers is not None else str
        names = ", ".join(f"rank {r} (host {hosts(r)})" for r in self.excluded)
        leaving = self.node.index in nodes
        message = (
            f"straggler {names} excluded (resilience.straggler_action=exclude): saved the "
            f"checkpoint of step {self.step}; node{'s' if len(nodes) > 1 else ''} "
            f"{', '.join(map(str, nodes))} of the rendezvous "
            + ("leaves the job" if leaving else "left; the others restart without it")
        )
        if leaving:  # said first: the agent's stop may end this process before its error line
            logger.error(message)
            os.kill(os.getppid(), signal.SIGTERM)  # the torchrun agent that started this rank
        raise LoomError(message)

    def _agree(self, *flags: bool) -> list[bool]:
        """Each flag true on any rank is true on every rank (one small collective a step), so
        that a signal one rank received or a clock one rank read stops or saves them all."""
        if not self.distributed:
            return list(flags)
        values = torch.tensor([float(f) for f in flags])
        agreed = self._guarded(lambda: distributed.all_reduce(values, op="max"), "agreeing")
        return [bool(v) for v in agreed.tolist()]

    def _rollback(self) -> None:
        """Back to the last checkpoint after `max_bad_steps` bad steps in a row; the batches of
        those steps are ruled out, the ones before them are trained on again."""
        bad = self.guard.consecutive
        self.checkpointer.finish(wait=True)
        distributed.barrier()  # rank 0 may be committing it
        path = self.checkpointer.latest()
        if path is None:
            raise LoomError(
                f"{bad} bad steps in a row up to step {self.step} and no checkpoint to roll back "
                "to; lower optimizer.lr, check the data, or raise resilience.max_bad_steps"
            )
        self.skip_batches |= set(range(self.batches - bad, self.batches))
        self._restore(path)
        self.guard.rolled_back()
        logger.warning(
            "%d bad steps in a row: rolled back to %s (step %d); their batches are skipped",
            bad,
            path,
            self.step,
        )

    def _guarded(self, work: Callable[[], T], what: str) -> T:
        """Run one phase of a step; under torchrun, failures (a collective that timed out, a
        peer that died) become one error naming this rank and the step."""
        if not self.distributed:
            return work()
        try:
            return work()
        except LoomError:
            raise
        except (RuntimeError, OSError, torch.distributed.DistBackendError) as e:
            reason = [line for line in str(e).splitlines() if line.strip()][:1] or [repr(e)]
            raise LoomError(
                f"rank {self.rank} failed {what}: {reason[0].strip()} "
                f"(collectives time out after parallel.timeout_s={self.cfg.parallel.timeout_s:g})"
            ) from e


def _warn_if_restarts_will_fail(rank: int) -> None:
    """Plain torchrun with --max-restarts shares its rendezvous store with the workers, and a
    restart then fails on gloo (pytorch issue 135712); `loom torchrun` turns that off."""
    if (
        rank == 0
        and restart_attempt() == 0
        and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
        and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    ):
        logger.warning(
            "torchrun --max-restarts: restarts will fail with this launcher's shared store; "
            "launch with `loom torchrun` (same arguments) or set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"
        )


@dataclass
class _Loop:
    """What the loop keeps between steps: its writers, watchdog and the current interval."""

    result: TrainResult
    metrics: MetricsWriter | None  # rank 0 only, like the ledger
    ledger: GoodputLedger | None
    progress: Progress
    watchdog: Watchdog
    interval_start: float = field(default_factory=time.perf_counter)
    interval_tokens: int = 0
    last_save: float = field(default_factory=time.monotonic)

    @classmethod
    def open(cls, trainer: Trainer, result: TrainResult) -> _Loop:
        cfg, writes = trainer.cfg, trainer.rank == 0
        run_dir, step = trainer.run_dir, trainer.step
        metrics = MetricsWriter(run_dir, cfg.metrics.tensorboard, step) if writes else None
        ledger = GoodputLedger.open(run_dir, trainer.process_start) if writes else None
        progress = Progress(cfg.metrics.progress if writes else "off", step, cfg.train.steps)
        watchdog = Watchdog(cfg.resilience.hang_timeout_s, run_dir, trainer.rank)
        loop = cls(result, metrics, ledger, progress, watchdog)
        if ledger is not None:
            ledger.training_started()
        return loop

    def close(self) -> None:
        self.watchdog.close()
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()


def train(cfg: Config) -> TrainResult:
    return Trainer(cfg).run()
