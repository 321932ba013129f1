"""What a kind of training decides, as one object the trainer is configured by.

The one `Trainer` runs any `TrainTask` (the role of torchtitan's train spec): it owns the
layout, the loop, resume, the resilience guards, metrics and checkpoints; the task says how
to open the data, build the model, compute the loss of a micro-batch, evaluate, and what it
adds to checkpoints and metrics. Pretraining is `pretraining()`; fine-tuning and DPO build
their tasks in loom.finetune. A new kind of training replaces the fields it changes
(`dataclasses.replace(pretraining(), micro_step=...)`) instead of subclassing the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from loom.core.config import Config, save_config
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.run_files import RunFiles
from loom.data.loader import SampleOrder, TokenLoader
from loom.data.shards import TokenDataset
from loom.parallel.parallelize import ParallelModel, parallelize

if TYPE_CHECKING:
    from loom.train.trainer import Trainer, TrainResult


@dataclass
class TaskData:
    """A task's opened data: the training stream and what identifies it in checkpoints."""

    loader: SampleOrder
    val: Sequence[Any]  # what the task's `evaluate` reads; empty: no validation loss
    identity: list[str]  # a resumed run must be given the same data
    tokenizer_hash: str
    tokenizer_dir: Path  # copied to <run_dir>/tokenizer


def build_model(trainer: Trainer, mesh: DeviceMesh | None) -> ParallelModel:
    from loom.core.loss import cross_entropy

    return parallelize(trainer.cfg, trainer.dims, mesh, trainer.device, cross_entropy)


def backpropagate(trainer: Trainer, batch: list[torch.Tensor], scale: float) -> torch.Tensor | None:
    """The model's own loss of (inputs, targets[, doc_ids]), backpropagated × `scale`."""
    inputs, targets, *doc_ids = batch
    return trainer.model.forward_backward(inputs, targets, scale, *doc_ids)


def open_token_data(cfg: Config) -> TaskData:
    """Check the token shards and set up the loader, the data's identity and tokenizer."""
    t = cfg.train
    if not cfg.data.sources():
        raise LoomError(
            "data.path is not set; pass --data.path=DIR (a folder made by `loom data tokenize`)"
        )
    datasets = [(TokenDataset(s.path), s.weight) for s in cfg.data.sources()]
    first = datasets[0][0]
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
    loader = TokenLoader([(d.split("train"), w) for d, w in datasets], t.seq_len, t.seed)
    # Validation: every dataset's val split that holds at least one sequence, same weights.
    val = [
        (d.splits["val"], w)
        for d, w in datasets
        if "val" in d.splits and (d.splits["val"].num_tokens - 1) // t.seq_len >= 1
    ]
    if not val:
        logger.warning("no validation split holds train.seq_len + 1 tokens; no validation loss")
    return TaskData(
        loader=loader,
        val=val,
        identity=[d.fingerprint for d, _ in datasets],
        tokenizer_hash=first.tokenizer_hash,
        tokenizer_dir=first.tokenizer_path.parent,
    )


def evaluate_tokens(trainer: Trainer) -> float:
    """Mean loss over the first `eval_batches` micro-batches of the validation split."""
    t = trainer.cfg.train
    micro = t.micro_batch_size or t.batch_size
    model, dp = trainer.model, trainer.dims.dp
    loader = TokenLoader(list(trainer.val), t.seq_len, seed=0, shuffle=False)
    # Whole micro-batches only, so that every data-parallel rank gets an equal share.
    n_batches = min(t.eval_batches, sum(loader.num_samples) // micro)
    for part in model.parts:
        part.eval()
    if n_batches == 0:
        logger.warning("the validation split holds fewer than one micro-batch; skipped")
        return math.nan
    total = torch.zeros((), device=trainer.device)
    for _ in range(n_batches):
        inputs, targets = loader.next_batch(micro, model.dp_rank, dp)
        loss = model.eval_loss(inputs.to(trainer.device), targets.to(trainer.device))
        total += model.global_mean(loss)
    return (total / n_batches).item()


def dense_flops_per_token(trainer: Trainer) -> float:
    """The FLOPs a step must do per token, the numerator of MFU (see `loom plan`)."""
    return trainer.cfg.model.flops_per_token(trainer.cfg.train.seq_len)


def no_metrics(trainer: Trainer) -> dict[str, float]:
    return {}


def accept_resume(state: dict[str, Any], run_dir: Path) -> None:
    """Pretraining's checkpoints are checked by the trainer alone (`check_resumable`)."""


def write_config(cfg: Config, run_dir: Path) -> None:
    save_config(cfg, RunFiles(run_dir).config)


def no_action(trainer: Trainer, result: TrainResult) -> None:
    """Pretraining has nothing to do before or after its run."""


@dataclass
class TrainTask:
    """The hooks of one kind of training; each gets the trainer (config, layout, model)."""

    open_data: Callable[[Config], TaskData]
    build_model: Callable[[Trainer, DeviceMesh | None], ParallelModel]
    # Backpropagate `scale` × the loss of one micro-batch; return that loss (unscaled).
    micro_step: Callable[[Trainer, list[torch.Tensor], float], torch.Tensor | None] = backpropagate
    evaluate: Callable[[Trainer], float] = evaluate_tokens
    flops_per_token: Callable[[Trainer], float] = dense_flops_per_token
    # Figures added to each metrics record (after the validation loss, if any).
    metrics: Callable[[Trainer], dict[str, float]] = no_metrics
    # What else each checkpoint's state records, and the check that a resumed one is this run's.
    checkpoint_state: Callable[[], dict[str, Any]] = dict
    check_resume: Callable[[dict[str, Any], Path], None] = accept_resume
    # The run folder's own files, written once the input is valid (rank 0).
    save_config: Callable[[Config, Path], None] = write_config
    # Before the first step and after the last (also when there was nothing to do).
    start: Callable[[Trainer, TrainResult], None] = no_action
    finish: Callable[[Trainer, TrainResult], None] = no_action
    planner_strategy: dict[str, object] = field(default_factory=dict)  # beyond the config
    trainable_only: bool = False  # checkpoints hold only the weights that train (adapters)


def pretraining() -> TrainTask:
    """Next-token prediction on token shards made by `loom data tokenize`."""
    return TrainTask(open_data=open_token_data, build_model=build_model)
