"""Reward models: a scalar head on the base model scores a whole answer (its output at the
last token), trained with the Bradley–Terry loss so that each pair's chosen answer out-scores
the rejected one, as TRL's RewardTrainer does."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loom.finetune.pairs import PairBatch, PairObjective, joined

if TYPE_CHECKING:
    from loom.train.trainer import Trainer


def last_token_scores(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """[rows] each row's score: the head's first output at the row's last token.

    Rows hold tokens[:-1] as inputs and tokens[1:] as targets, so the last token is the last
    trained target: it is put back at the end of the inputs, and the columns after it (padding,
    invisible to causal attention) are cut."""
    columns = torch.arange(targets.shape[1], device=targets.device)
    last = ((targets != -100) * columns).argmax(1)  # the last trained target of each row
    end = last + 1  # where that token sits as an input
    width = int(end.max()) + 1
    full = F.pad(inputs, (0, 1))[:, :width].clone()
    full.scatter_(1, end[:, None], targets.gather(1, last[:, None]))
    return model(full)[..., 0].gather(1, end[:, None]).squeeze(1)


def bradley_terry_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, center: float = 0.0
) -> torch.Tensor:
    """Each pair's −log σ(r_chosen − r_rejected), plus `center`·(r_chosen + r_rejected)² to
    keep the rewards near zero (TRL's center_rewards_coefficient)."""
    loss = -F.logsigmoid(chosen - rejected)
    return loss + center * (chosen + rejected) ** 2 if center else loss


class RewardModeling(PairObjective):
    """A reward model's training on preference pairs; its rewards are the scores themselves."""

    def __init__(self, center: float) -> None:
        super().__init__()
        self.center = center

    def pairs(
        self, trainer: Trainer, batch: PairBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, targets = joined(batch)
        with trainer.model.autocast:
            scores = last_token_scores(trainer.model.parts[0], inputs, targets).float()
        chosen, rejected = scores.chunk(2)
        return (
            bradley_terry_loss(chosen, rejected, self.center),
            chosen.detach(),
            rejected.detach(),
        )
