"""Training on preference pairs: the step, the validation pass and the reward metrics that DPO
and reward models share. Each method says only how a batch of pairs becomes per-pair losses
and the rewards of the chosen and the rejected answers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from loom.core import distributed
from loom.finetune.rows import validation_batches

if TYPE_CHECKING:
    from loom.train.trainer import Trainer

# chosen inputs, chosen targets, rejected inputs, rejected targets (rows of PairRows)
PairBatch = list[torch.Tensor]


class PairObjective(ABC):
    """The hooks of a fine-tuning task on preference pairs, and the rewards they keep between
    metric records."""

    def __init__(self) -> None:
        self._rewards: list[torch.Tensor] = []  # chosen − rejected rewards since the last record
        self._val_rewards: tuple[float, float] | None = None  # accuracy, margin

    @abstractmethod
    def pairs(
        self, trainer: Trainer, batch: PairBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each pair's loss, and the rewards of its chosen and its rejected answer."""

    def micro_step(self, trainer: Trainer, batch: PairBatch, scale: float) -> torch.Tensor:
        losses, chosen, rejected = self.pairs(trainer, batch)
        loss = losses.mean()
        (loss * scale).backward()
        self._rewards.append(chosen - rejected)
        return loss.detach()

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> float:
        """The loss per pair over the whole validation set; keeps its reward figures."""
        totals = torch.zeros(4, device=trainer.device)  # loss sum, weight, reward hits, margin
        for tensors, real in validation_batches(trainer, trainer.val[0]):
            losses, chosen, rejected = self.pairs(trainer, tensors)
            weight = real.to(trainer.device).float()
            margin = (chosen - rejected) * weight
            stats = [(losses * weight).sum(), weight.sum(), (margin > 0).sum(), margin.sum()]
            totals += torch.stack(stats).float()
        if trainer.distributed:
            totals = distributed.all_reduce(totals)
        self._val_rewards = ((totals[2] / totals[1]).item(), (totals[3] / totals[1]).item())
        return (totals[0] / totals[1]).item()

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        """The share of pairs whose chosen answer out-rewards the rejected one, and the mean
        reward margin, over the steps since the last record (and on validation)."""
        record: dict[str, float] = {}
        if self._rewards:
            margins = torch.cat(self._rewards)
            self._rewards = []
            stats = torch.stack([(margins > 0).float().mean(), margins.mean()])
            dp = trainer.dims.dp
            stats = distributed.all_reduce(stats) / dp if trainer.distributed else stats
            record = {"reward_accuracy": stats[0].item(), "reward_margin": stats[1].item()}
        if self._val_rewards is not None:
            record["val_reward_accuracy"], record["val_reward_margin"] = self._val_rewards
            self._val_rewards = None
        return record


def joined(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen rows, then the rejected rows, as one batch of inputs and targets, cut after
    the last scored column: one answer per row, padded at the end, and the columns after it
    change nothing (attention is causal)."""
    chosen_in, chosen_tg, rejected_in, rejected_tg = batch
    inputs, targets = torch.cat([chosen_in, rejected_in]), torch.cat([chosen_tg, rejected_tg])
    scored = (targets != -100).any(0).nonzero()
    width = int(scored.max()) + 1 if len(scored) else 1
    return inputs[:, :width], targets[:, :width]
