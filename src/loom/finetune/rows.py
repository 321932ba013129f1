"""Fine-tuning rows as batches: the resumable training order and the validation slots."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from loom.core.errors import LoomError
from loom.data.loader import SampleOrder
from loom.finetune.sft_data import PairRows, Rows

if TYPE_CHECKING:
    from loom.train.trainer import Trainer


class RowLoader(SampleOrder):
    """Fine-tuning rows in a seeded, resumable order (the pretraining loader's bookkeeping)."""

    def __init__(self, rows: Rows | PairRows, seq_len: int, seed: int) -> None:
        if len(rows) == 0:
            raise LoomError("no training example is left after the data checks; see the report")
        super().__init__([len(rows)], [1.0], seq_len, seed, shuffle=True)
        self.rows = rows
        self.packed = holds_several_examples(rows)

        # Trained targets per row; of the last global micro-batch drawn, and of this rank's share.
        self.trained = (rows.targets != -100).sum(dim=1) if isinstance(rows, Rows) else None
        self.global_trained = self.share_trained = 1
        self._drawn = np.zeros((0, 2), dtype=np.int64)

    def next_indices(self, n: int) -> np.ndarray:
        self._drawn = super().next_indices(n)
        return self._drawn

    def next_share(self, n: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        share = super().next_share(n, rank, world_size)
        if self.trained is not None:
            self.global_trained = int(self.trained[torch.from_numpy(self._drawn[:, 1])].sum())
            self.share_trained = int(self.trained[torch.from_numpy(share[:, 1])].sum())
        return share

    def batch(self, pairs: np.ndarray) -> list[torch.Tensor]:
        return row_tensors(self.rows, torch.from_numpy(pairs[:, 1]), self.packed)


def holds_several_examples(rows: Rows | PairRows) -> bool:
    """Whether some row holds a second example (a trained target of doc id > 0): only then does
    attention need the document mask. Trailing padding has an id of its own but no targets,
    and causal attention hides it anyway."""
    return isinstance(rows, Rows) and bool(((rows.doc_ids > 0) & (rows.targets != -100)).any())


def row_tensors(rows: Rows | PairRows, index: torch.Tensor, packed: bool) -> list[torch.Tensor]:
    """inputs, targets (and doc ids when rows hold several examples) of the rows at `index`;
    for preference pairs: chosen inputs, targets, rejected inputs, targets."""
    if isinstance(rows, PairRows):
        c, r = rows.chosen, rows.rejected
        return [c.inputs[index], c.targets[index], r.inputs[index], r.targets[index]]
    out = [rows.inputs[index], rows.targets[index]]
    return [*out, rows.doc_ids[index].long()] if packed else out


def validation_batches(
    trainer: Trainer, rows: Rows | PairRows
) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
    """The whole validation set in micro-batches on the device, with which slots are real.

    Every rank runs the same number of forward passes (FSDP gathers weights together); the
    slots past the end repeat row 0 and are marked not real."""
    dp, rank = trainer.dims.dp, trainer.model.dp_rank
    micro = max(1, (trainer.cfg.train.micro_batch_size or trainer.cfg.train.batch_size) // dp)
    for part in trainer.model.parts:
        part.eval()
    per_rank = -(-len(rows) // dp)
    slots = torch.arange(rank, per_rank * dp, dp)
    packed = holds_several_examples(rows)
    for start in range(0, len(slots), micro):
        index = slots[start : start + micro]
        real = index < len(rows)
        yield [x.to(trainer.device) for x in row_tensors(rows, index * real, packed)], real
