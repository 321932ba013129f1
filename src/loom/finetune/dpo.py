"""DPO (Rafailov et al. 2023): the loss, evaluation and reward metrics of preference pairs.

The policy is the trained model; the reference is a frozen copy of the base, or the same
model with its adapters switched off when DPO trains LoRA adapters (`dpo.lora`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loom.core import distributed
from loom.core.lora import adapters_disabled
from loom.finetune.rows import validation_batches
from loom.parallel.parallelize import ParallelModel

if TYPE_CHECKING:
    from loom.train.trainer import Trainer


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of each row's trained target tokens: [rows]."""
    mask = targets != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO on [2·pairs] log-probs, chosen rows first: each pair's loss, and the implicit
    rewards β·(log π − log π_ref) of the chosen and the rejected answers."""
    rewards = beta * (policy - reference.detach())
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


class Preference:
    """The DPO hooks of a fine-tuning task, and the rewards they keep between records."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.reference: ParallelModel | None = None  # None: the policy without its adapters
        self._rewards: list[torch.Tensor] = []  # chosen − rejected rewards since the last record
        self._val_rewards: tuple[float, float] | None = None  # accuracy, margin

    def micro_step(self, trainer: Trainer, batch: list[torch.Tensor], scale: float) -> torch.Tensor:
        losses, chosen, rejected = self._pairs(trainer, batch)
        loss = losses.mean()
        (loss * scale).backward()
        self._rewards.append(chosen - rejected)
        return loss.detach()

    def _pairs(
        self, trainer: Trainer, batch: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen_in, chosen_tg, rejected_in, rejected_tg = batch
        inputs = torch.cat([chosen_in, rejected_in])
        targets = torch.cat([chosen_tg, rejected_tg])
        # One answer per row, padded at the end: the columns after the last scored position
        # change nothing (attention is causal), so they are cut.
        scored = (targets != -100).any(0).nonzero()
        width = int(scored.max()) + 1 if len(scored) else 1
        inputs, targets = inputs[:, :width], targets[:, :width]
        policy = trainer.model.parts[0]
        reference = self.reference.parts[0] if self.reference is not None else policy
        off: AbstractContextManager[object] = (
            adapters_disabled(policy) if self.reference is None else nullcontext()
        )
        with trainer.model.autocast:
            with torch.no_grad(), off:
                ref_logps = sequence_logps(reference(inputs), targets)
            logps = sequence_logps(policy(inputs), targets)
        return dpo_loss(logps, ref_logps, self.beta)

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> float:
        """The loss per pair over the whole validation set; keeps its reward figures."""
        totals = torch.zeros(4, device=trainer.device)  # loss sum, weight, reward hits, margin
        for tensors, real in validation_batches(trainer, trainer.val[0]):
            losses, chosen, rejected = self._pairs(trainer, tensors)
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
