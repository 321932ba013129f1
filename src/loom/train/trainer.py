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
from loom.core.checkpoint import Checkpointer, read_state
from loom.core.config import Config, config_to_dict, save_config
from loom.core.device import select_device
from loom.core.errors import LoomError
from loom.core.log import is_terminal, logger
from loom.core.loss import cross_entropy
from loom.core.run_files import MetricsLine, RankNote, RunFiles
from loom.data.loader import SampleOrder, TokenLoader
from loom.data.shards import TokenDataset
from loom.parallel.dims import resolve
from loom.parallel.parallelize import ParallelModel, parallelize
from loom.planner.hardware import peak_at_least, peak_flops
from loom.planner.training import auto_layout, check_fits
from loom.train.metrics import MetricsWriter, peak_memory_gib
from loom.train.optim import Optimizers
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
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        t = cfg.train
        if not cfg.run_dir:
            raise LoomError(
                'run_dir is not set; add run_dir = "..." to the config or pass --run_dir=DIR'
            )
        self.run_dir = Path(cfg.run_dir)
        self.process_start = process_start_time()
        parse_faults(os.environ.get("LOOM_FAULTS", ""))  # a bad spec fails before any work
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise LoomError(f"run_dir {self.run_dir} is a file; choose a folder")
        self._open_data()
        self.device = select_device(t.device)
        if (
            t.precision == "bf16"
            and self.device.type == "cuda"
            and not torch.cuda.is_bf16_supported()
        ):
            raise LoomError(
                "train.precision=bf16 is not supported by this GPU; use train.precision=fp32"
            )
        self.distributed = distributed.launched_by_torchrun()
        world = int(os.environ["WORLD_SIZE"]) if self.distributed else 1
        if cfg.parallel.auto:
            cfg = self.cfg = auto_layout(cfg, world, self.device)
        self.dims = resolve(cfg, world)
        check_fits(cfg, self.dims, self.device, force=t.force, **self._planner_strategy())
        if not self.distributed and cfg.memory.offload == "params":
            raise LoomError(
                "memory.offload=params works through FSDP, which needs a process group; "
                "launch with `loom train CONFIG --nproc N` (N may be 1)"
            )
        self.checkpointer = Checkpointer(
            self.run_dir,
            cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_,
            trainable_only=self.trainable_only,
        )
        self.resume_from = self.checkpointer.latest()
        resume_state = (
            check_resumable(self.resume_from, cfg, self.data_identity, self.tokenizer_hash)
            if self.resume_from
            else None
        )
        if resume_state is not None:
            self._check_resume(resume_state)

        # Input is valid: from here on the run folder is written.
        self.rank = 0
        mesh = None
        if self.distributed:
            distributed.init_process_group(self.device, cfg.parallel.timeout_s)
            self.rank = distributed.rank()
            mesh = self.dims.build_mesh(self.device.type)
            _warn_if_restarts_will_fail(self.rank)
        self.step = 0
        self.tokens_seen = 0
        self.batches = 0  # global batches drawn from the loader (skipped ones included)
        self.skip_batches: set[int] = set()  # batches a rollback ruled out
        self.injector = FaultInjector(self.rank)
        self.checkpointer.before_commit = self.injector.in_checkpoint
        self.guard = StepGuard(cfg.resilience)
        self._report_progress()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._save_config()
            tokenizer = RunFiles(self.run_dir).tokenizer
            shutil.copytree(self.tokenizer_dir, tokenizer, dirs_exist_ok=True)

        self.model: ParallelModel = self._build_model(mesh)
        self.optimizers = Optimizers(self.model.parts, cfg.optimizer, t.steps)
        if self.resume_from is not None:
            assert resume_state is not None
            self._restore(self.resume_from)
            if resume_state["loader"]["seed"] != t.seed:
                logger.warning(
                    "train.seed=%d differs from the run's seed %d; the data order continues with "
                    "the run's seed",
                    t.seed,
                    resume_state["loader"]["seed"],
                )
            logger.info("resumed from %s (step %d)", self.resume_from, self.step)
        self.peak_flops, peak_source = peak_flops(self.device, t.precision)
        self.peak_flops *= world
        self.processes = world
        self.flops_per_token = self._flops_per_token()
        logger.info(
            "model %s: %.2fM parameters, %.3g FLOPs/token; layout %s; peak %.3g FLOP/s (%s)",
            cfg.model.preset,
            cfg.model.num_params() / 1e6,
            self.flops_per_token,
            self.layout,
            self.peak_flops,
            peak_source,
        )

    # -- what a kind of training decides (fine-tuning overrides these) ---------------------

    trainable_only = False  # checkpoints hold all weights (adapter training: only its own)

    def _planner_strategy(self) -> dict[str, object]:
        """What the planner is told beyond the config (fine-tuning: the adapters)."""
        return {}

    def _raise_peak_to(self, achieved: float) -> None:
        """A step faster than the peak proves the peak mis-measured (a noisy moment on a shared
        CPU): measure again, so MFU is never reported against a peak below a real step."""
        if achieved > self.peak_flops > 0:
            n = self.processes
            per_process = peak_at_least(
                self.device, self.cfg.train.precision, achieved / n, self.peak_flops / n
            )
            self.peak_flops = per_process * n

    def _flops_per_token(self) -> float:
        """The FLOPs a step must do per token, the numerator of MFU (see `loom plan`)."""
        return self.cfg.model.flops_per_token(self.cfg.train.seq_len)

    def _open_data(self) -> None:
        """Check the token shards and set up the loaders, the data's identity and tokenizer."""
        cfg, t = self.cfg, self.cfg.train
        if not cfg.data.sources():
            raise LoomError(
                "data.path is not set; pass --data.path=DIR (a folder made by `loom data tokenize`)"
            )
        datasets = [(TokenDataset(s.path), s.weight) for s in cfg.data.sources()]
        first = datasets[0][0]
        self.data_identity = [d.fingerprint for d, _ in datasets]
        self.tokenizer_hash = first.tokenizer_hash
        self.tokenizer_dir = first.tokenizer_path.parent
        for other, _ in datasets[1:]:
            if other.tokenizer_hash != first.tokenizer_hash:
                raise LoomError(
                    f"data.mix: {other.path} and {first.path} were tokenized with different "
                    "tokenizers; prepare every dataset of a mixture with the same tokenizer"
                )
        if first.vocab_size > cfg.model.vocab_size:
            raise LoomError(
                f"the tokenizer of {first.path} has {first.vocab_size} tokens but "
                f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size to at least "
                f"{first.vocab_size} or train a smaller tokenizer"
            )
        self.loader: SampleOrder = TokenLoader(
            [(d.split("train"), w) for d, w in datasets], t.seq_len, t.seed
        )
        # Validation: every dataset's val split that holds at least one sequence, same weights.
        self.val = [
            (d.splits["val"], w)
            for d, w in datasets
            if "val" in d.splits and (d.splits["val"].num_tokens - 1) // t.seq_len >= 1
        ]
        if not self.val:
            logger.warning("no validation split holds train.seq_len + 1 tokens; no validation loss")

    def _save_config(self) -> None:
        save_config(self.cfg, RunFiles(self.run_dir).config)

    def _build_model(self, mesh: DeviceMesh | None) -> ParallelModel:
        return parallelize(self.cfg, self.dims, mesh, self.device, cross_entropy)

    def _checkpoint_state(self) -> dict[str, Any]:
        """What else the checkpoint's state.json records."""
        return {}

    def _check_resume(self, state: dict[str, Any]) -> None:
        """Refuse to continue a checkpoint that `_checkpoint_state` says is another run's."""

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
        named = {"pp": d.pp, "dp_replicate": d.dp_replicate, "dp_shard": d.dp_shard, "tp": d.tp}
        return " × ".join(f"{k} {v}" for k, v in named.items() if v > 1)

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
        for _ in range(accum):
            share = self.loader.next_share(micro, self.model.dp_rank, self.dims.dp)
            shares.append(share)
            batch = [x.to(self.device, non_blocking=True) for x in self.loader.batch(share)]
            loss = self._micro_step(batch, 1.0 / accum)
            if loss is not None:
                loss_sum = loss if loss_sum is None else loss_sum + loss
        self.batches += 1
        self.tokens_seen += t.batch_size * t.seq_len
        if self.cfg.metrics.sample_log:
            self._log_samples(shares)
        mean = loss_sum / accum if loss_sum is not None else None
        return self.model.global_mean(mean)

    def _micro_step(self, batch: list[torch.Tensor], scale: float) -> torch.Tensor | None:
        """Backpropagate `scale` × the loss of one micro-batch (inputs, targets[, doc_ids])."""
        inputs, targets, *doc_ids = batch
        return self.model.forward_backward(inputs, targets, scale, *doc_ids)

    def _extra_metrics(self) -> dict[str, float]:
        """Figures a kind of training adds to each metrics record."""
        return {}

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

    def evaluate(self) -> float:
        """Mean loss over the first `eval_batches` micro-batches of the validation split."""
        t = self.cfg.train
        micro = t.micro_batch_size or t.batch_size
        loader = TokenLoader(self.val, t.seq_len, seed=0, shuffle=False)
        # Whole micro-batches only, so that every data-parallel rank gets an equal share.
        n_batches = min(t.eval_batches, sum(loader.num_samples) // micro)
        for part in self.model.parts:
            part.eval()
        if n_batches == 0:
            logger.warning("the validation split holds fewer than one micro-batch; skipped")
            return math.nan
        total = torch.zeros((), device=self.device)
        for _ in range(n_batches):
            inputs, targets = loader.next_batch(micro, self.model.dp_rank, self.dims.dp)
            loss = self.model.eval_loss(inputs.to(self.device), targets.to(self.device))
            total += self.model.global_mean(loss)
        return (total / n_batches).item()

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
            **self._checkpoint_state(),
        }
        return self.checkpointer.save(
            self.step, self.model.parts, self.optimizers.optimizers, state
        )

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        result = TrainResult(self.run_dir, self.step)
        if self.step >= t.steps:
            logger.info(
                "run %s is already at step %d of %d; nothing to do",
                self.run_dir,
                self.step,
                t.steps,
            )
            return result
        writes = self.rank == 0
        metrics = (
            MetricsWriter(self.run_dir, cfg.metrics.tensorboard, self.step) if writes else None
        )
        ledger = GoodputLedger.open(self.run_dir, self.process_start) if writes else None
        progress = _Progress(cfg.metrics.progress if writes else "off", self.step, t.steps)
        watchdog = Watchdog(cfg.resilience.hang_timeout_s, self.run_dir, self.rank)
        interval_start, interval_tokens = time.perf_counter(), 0
        last_save = time.monotonic()
        if ledger is not None:
            ledger.training_started()
        try:
            with StopSignal() as stop:
                while self.step < t.steps:
                    watchdog.arm(f"rank {self.rank}: step {self.step + 1}")
                    self._report_progress()
                    step_start = time.perf_counter()
                    self.injector.at_step_start(self.step + 1)
                    loss, grad_norm, lr = self._guarded(self.train_step, f"in step {self.step + 1}")
                    self.step += 1
                    interval_tokens += t.batch_size * t.seq_len
                    if self.guard.rollback_due:
                        self._guarded(self._rollback, f"rolling back after step {self.step}")
                        if metrics is not None:
                            metrics.rewind(self.step)
                        progress.rewind(self.step)
                        watchdog.disarm()
                        continue
                    last = self.step == t.steps
                    do_eval = bool(self.val) and (
                        last or (t.eval_interval and self.step % t.eval_interval == 0)
                    )
                    step_seconds = 0.0
                    if do_eval or last or self.step % cfg.metrics.log_interval == 0:
                        loss_value = loss.item()  # synchronises the device before timing
                        step_seconds = time.perf_counter() - step_start
                        elapsed = time.perf_counter() - interval_start
                        tokens_per_s = interval_tokens / elapsed
                        self._raise_peak_to(self.flops_per_token * tokens_per_s)
                        per_rank = self._guarded(
                            lambda: distributed.per_rank(peak_memory_gib(self.device)),
                            f"logging step {self.step}",
                        )
                        record: MetricsLine = {
                            "step": self.step,
                            "loss": loss_value,
                            "lr": lr,
                            "grad_norm": grad_norm.item(),
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
                        if ledger is not None:
                            record["goodput"] = ledger.goodput
                            record["checkpoint_s"] = ledger.checkpoint_s
                        if do_eval:
                            record["val_loss"] = self._guarded(
                                self.evaluate, f"evaluating after step {self.step}"
                            )
                            result.val_losses[self.step] = record["val_loss"]
                        record.update(self._extra_metrics())
                        if metrics is not None:
                            metrics.write(record)
                        progress.update(record)
                        result.train_losses[self.step] = loss_value
                        result.tokens_per_s = tokens_per_s
                        interval_start, interval_tokens = time.perf_counter(), 0
                    else:
                        step_seconds = time.perf_counter() - step_start
                    if ledger is not None:
                        ledger.step_done(self.step, step_seconds)
                    stopping, time_due = self._agree(
                        stop.received is not None,
                        bool(cfg.checkpoint.interval_minutes)
                        and time.monotonic() - last_save >= 60 * cfg.checkpoint.interval_minutes,
                    )
                    save_start = time.perf_counter()
                    self._guarded(
                        lambda: self.checkpointer.finish(wait=False),
                        f"committing a checkpoint after step {self.step}",
                    )
                    periodic = time_due or self.step % cfg.checkpoint.interval == 0
                    # Not in the middle of a run of bad steps: a rollback must land before it.
                    if last or stopping or (periodic and not self.guard.consecutive):
                        self._guarded(
                            self.save_checkpoint, f"saving the checkpoint of step {self.step}"
                        )
                        last_save = time.monotonic()
                    if ledger is not None:
                        ledger.checkpoint_stall(time.perf_counter() - save_start)
                        ledger.skipped_steps = self.guard.skipped
                        ledger.rollbacks = self.guard.rollbacks
                        ledger.save()
                    watchdog.disarm()
                    if stopping:
                        received = stop.received
                        result.stopped_by = (
                            signal.Signals(received).name if received else "a signal to a peer"
                        )
                        break
                watchdog.arm(f"rank {self.rank}: writing the last checkpoint")
                save_start = time.perf_counter()
                self._guarded(
                    lambda: self.checkpointer.finish(wait=True), "writing the last checkpoint"
                )
                distributed.barrier()
                if ledger is not None:
                    ledger.checkpoint_stall(time.perf_counter() - save_start)
                    ledger.save()
                    result.goodput = ledger.summary()
                    _log_goodput(result.goodput)
        finally:
            watchdog.close()  # a hang never gets here: the watchdog exits the process first
            progress.close()
            if metrics is not None:
                metrics.close()
        result.step = self.step
        return result

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


def _log_goodput(g: dict[str, float | int]) -> None:
    logger.info(
        "goodput %.1f%% of %.0f s (productive %.0f s; lost: restarts %d / %.0f s, recomputed "
        "%d steps / %.0f s, checkpoints %.1f s, set-up %.0f s, other %.0f s; %d skipped steps, "
        "%d rollbacks)",
        100 * g["goodput"],
        g["wall_s"],
        g["productive_s"],
        g["restarts"],
        g["restarts_s"],
        g["recomputed_steps"],
        g["recomputed_s"],
        g["checkpoint_s"],
        g["setup_s"],
        g["other_s"],
        g["skipped_steps"],
        g["rollbacks"],
    )


class _Progress:
    """A rich progress bar on a terminal, plain log lines otherwise."""

    def __init__(self, mode: str, start: int, total: int) -> None:
        self.off = mode == "off"  # ranks other than 0 say nothing
        self.rich = mode == "rich" or (mode == "auto" and is_terminal())
        self._bar = None
        if self.rich:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task("train", total=total, completed=start, status="")
            self._bar.start()

    def update(self, r: dict[str, Any]) -> None:
        status = f"loss {r['loss']:.4f}  {r['tokens_per_s']:,.0f} tok/s  mfu {r['mfu']:.1%}"
        if "val_loss" in r:
            status += f"  val {r['val_loss']:.4f}"
        if self.off:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=r["step"], status=status)
            if "val_loss" in r:
                self._bar.console.log(f"step {r['step']}: val_loss {r['val_loss']:.4f}")
        else:
            logger.info(
                "step %d  loss %.4f  lr %.2e  grad_norm %.3f  %s tok/s  mfu %.1f%%  mem %.2f GiB%s",
                r["step"],
                r["loss"],
                r["lr"],
                r["grad_norm"],
                f"{r['tokens_per_s']:,.0f}",
                100 * r["mfu"],
                r["peak_mem_gib"],
                f"  val_loss {r['val_loss']:.4f}" if "val_loss" in r else "",
            )
            extra = {k: v for k, v in r.items() if k.startswith(("reward_", "val_reward_"))}
            if extra:
                logger.info(
                    "step %d  %s", r["step"], "  ".join(f"{k} {v:.4f}" for k, v in extra.items())
                )

    def rewind(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def train(cfg: Config) -> TrainResult:
    return Trainer(cfg).run()
