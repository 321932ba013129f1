"""DPO (Rafailov et al. 2023): the loss of preference pairs against a reference policy.

The policy is the trained model; the reference is a frozen copy of the base, or the same
model with its adapters switched off when DPO trains LoRA adapters (`dpo.lora`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loom.core.lora import adapters_disabled
from loom.finetune.pairs import PairBatch, PairObjective, joined
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


class Preference(PairObjective):
    """DPO against a frozen reference: a frozen copy of the base, or (None) the policy with its
    adapters off."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta
        self.reference: ParallelModel | None = None  # None: the policy without its adapters

    def pairs(
        self, trainer: Trainer, batch: PairBatch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs, targets = joined(batch)
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
