"""Knowledge distillation: the student (the fine-tuned model) learns a teacher's next-token
distributions on the data's trained tokens (Hinton et al. 2015), e.g. to make a small draft
model for speculative decoding that agrees with the model it serves."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loom.core import distributed
from loom.core.errors import LoomError
from loom.finetune.rows import RowLoader, validation_batches
from loom.models.llama import Transformer
from loom.models.sources import load_model

if TYPE_CHECKING:
    from loom.train.trainer import Trainer


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL, CE) as means over the trained targets (≠ -100) of logits [..., vocab]:
    loss = (1 − α)·T²·KL(teacher_T ‖ student_T) + α·CE(student, targets), with _T the
    distributions at temperature T (T² keeps the gradients' scale as T changes)."""
    trained = targets != -100
    s = F.log_softmax(student[trained].float() / temperature, dim=-1)
    t = F.log_softmax(teacher[trained].float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    ce = F.cross_entropy(student[trained].float(), targets[trained])
    return (1 - alpha) * temperature**2 * kl + alpha * ce, kl.detach(), ce.detach()


class Distillation:
    """The hooks of a distillation task: the step, the validation pass and the KL/CE figures
    kept between metric records. The teacher is frozen, whole on every rank."""

    def __init__(self, teacher: Path, temperature: float, alpha: float, scratch: Path) -> None:
        self.teacher_path = teacher
        self.temperature = temperature
        self.alpha = alpha
        self.scratch = scratch
        self.teacher: Transformer | None = None
        self._figures: list[torch.Tensor] = []  # (KL, CE) per micro-step since the last record
        self._val: dict[str, float] = {}

    def load_teacher(self, trainer: Trainer, vocab_size: int) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        teacher, _ = load_model(self.teacher_path, torch.float32, self.scratch, trainer.device)
        if teacher.cfg.vocab_size != vocab_size:
            raise LoomError(
                f"distill.teacher {self.teacher_path} has a vocabulary of "
                f"{teacher.cfg.vocab_size} tokens, the student {vocab_size}: a teacher must "
                "share the student's tokenizer"
            )
        self.teacher = teacher.requires_grad_(False).eval()

    def losses(
        self, trainer: Trainer, batch: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, KL, CE, trained targets) of a batch of rows (inputs, targets[, doc_ids])."""
        assert self.teacher is not None
        inputs, targets, *doc_ids = batch
        kwargs = {"doc_ids": doc_ids[0]} if doc_ids else {}
        with trainer.model.autocast:
            student = trainer.model.parts[0](inputs, **kwargs)
            with torch.no_grad():
                teacher = self.teacher(inputs, **kwargs)
        count = (targets != -100).sum()
        if not count:  # (a rank's share without trained targets still runs the forward)
            zero = student.float().sum() * 0
            return zero, zero.detach(), zero.detach(), count
        loss, kl, ce = distill_loss(student, teacher, targets, self.temperature, self.alpha)
        return loss, kl, ce, count

    def micro_step(
        self, trainer: Trainer, batch: list[torch.Tensor], scale: float
    ) -> torch.Tensor | None:
        """The mean over the trained targets of the global micro-batch, each rank's mean
        weighted by its share (as supervised fine-tuning's)."""
        loader = trainer.loader
        assert isinstance(loader, RowLoader)
        weight = loader.share_trained * trainer.dims.dp / loader.global_trained
        loss, kl, ce, _ = self.losses(trainer, batch)
        (loss * scale * weight).backward()
        self._figures.append(torch.stack([kl, ce]))
        return loss.detach() * weight

    @torch.no_grad()
    def evaluate(self, trainer: Trainer) -> float:
        """The loss over the validation rows, weighted by trained targets (KL and CE kept)."""
        totals = torch.zeros(4, device=trainer.device)  # loss, KL, CE sums; trained targets
        for tensors, real in validation_batches(trainer, trainer.val[0]):
            tensors[1][~real.to(trainer.device)] = -100
            loss, kl, ce, count = self.losses(trainer, tensors)
            if count:
                totals += torch.stack([loss * count, kl * count, ce * count, count.float()])
        if trainer.distributed:
            totals = distributed.all_reduce(totals)
        self._val = {
            "val_kl": (totals[1] / totals[3]).item(),
            "val_ce": (totals[2] / totals[3]).item(),
        }
        return (totals[0] / totals[3]).item()

    def metrics(self, trainer: Trainer) -> dict[str, float]:
        record: dict[str, float] = {}
        if self._figures:
            kl, ce = torch.stack(self._figures).mean(0).tolist()
            record = {"kl": kl, "ce": ce}
            self._figures = []
        record.update(self._val)
        self._val = {}
        return record
