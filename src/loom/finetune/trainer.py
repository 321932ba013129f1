"""`loom finetune`: the pretraining trainer, started from a released model, on JSONL data.

What differs from pretraining is decided here and nowhere else: the data (rendered chat rows,
loss on replies only, packed without cross-attention), the weights (loaded from the base after
the parallel layout is built, LoRA adapters added before it, NF4 base weights for QLoRA), the
checkpoint (only the trainable weights when adapters train), the loss (DPO against a frozen
reference) and the output (`<run_dir>/adapter/` in PEFT's layout). Layouts, resume, restarts,
guards, metrics and checkpoints are the shared trainer's.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh

from loom.core import distributed
from loom.core.config import config_to_dict
from loom.core.errors import LoomError
from loom.core.log import logger
from loom.core.lora import (
    adapters_disabled,
    apply_lora,
    base_weight_bytes,
    init_lora_parameter_,
    merge_lora,
    quantize_base_nf4,
)
from loom.core.loss import cross_entropy
from loom.core.run_files import RunFiles
from loom.core.tokenizer import load_tokenizer, tokenizer_hash
from loom.data.loader import SampleOrder
from loom.finetune.adapter import save_adapter
from loom.finetune.config import FinetuneConfig, training_config
from loom.finetune.sft_data import PairRows, Rows, build_preferences, build_sft
from loom.models.convert import copy_tokenizer_files
from loom.models.sources import describe, load_model
from loom.parallel.parallelize import ParallelModel, parallelize, set_whole_parameter
from loom.parallel.recompute import clean_name
from loom.train.metrics import MetricsWriter
from loom.train.trainer import Trainer, TrainResult


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


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log-probabilities of each row's trained target tokens: [rows]."""
    mask = targets != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al. 2023) on [2·pairs] log-probs, chosen rows first: each pair's loss,
    and the implicit rewards β·(log π − log π_ref) of the chosen and the rejected answers."""
    rewards = beta * (policy - reference.detach())
    chosen, rejected = rewards.chunk(2)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


class FinetuneTrainer(Trainer):
    def __init__(self, ft: FinetuneConfig) -> None:
        self.ft = ft
        self.method = ft.finetune.method
        self.base_path = Path(ft.model.path).resolve()
        self._scratch = tempfile.TemporaryDirectory(prefix="loom-base-")
        base_cfg, self.base_tokenizer_dir = describe(self.base_path, Path(self._scratch.name))
        self.trainable_only = ft.uses_lora
        self.reference: ParallelModel | None = None
        self._rewards: list[torch.Tensor] = []  # DPO: chosen − rejected rewards since the log
        self._val_rewards: tuple[float, float] | None = None  # DPO: accuracy, margin
        super().__init__(training_config(ft, base_cfg))

    # -- data ---------------------------------------------------------------------------------

    def _open_data(self) -> None:
        ft, t = self.ft, self.cfg.train
        tokenizer_file = self.base_tokenizer_dir / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise LoomError(f"{self.base_path} has no tokenizer.json; fine-tuning needs one")
        tokenizer = load_tokenizer(tokenizer_file)
        if tokenizer.get_vocab_size() > self.cfg.model.vocab_size:
            raise LoomError(
                f"the tokenizer of {self.base_path} has {tokenizer.get_vocab_size()} tokens, more "
                f"than the model's {self.cfg.model.vocab_size}"
            )
        # Only the tokenizer files travel to <run_dir>/tokenizer (an HF folder also holds weights).
        self.tokenizer_dir = Path(self._scratch.name) / "tokenizer"
        copy_tokenizer_files(self.base_tokenizer_dir, self.tokenizer_dir)
        self.tokenizer_hash = tokenizer_hash(tokenizer)
        d = ft.data
        options: dict[str, Any] = {
            "template": d.template,
            "overlong": d.overlong,
            "val_fraction": d.val_fraction,
            "val_path": d.val_path or None,
            "seed": t.seed,
        }
        if self.method == "dpo":
            data: Any = build_preferences(d.path, self.tokenizer_dir, t.seq_len, **options)
        else:
            data = build_sft(d.path, self.tokenizer_dir, t.seq_len, packing=d.packing, **options)
        self.report = data.report
        self.loader: SampleOrder = RowLoader(data.train, t.seq_len, t.seed)
        self.val_rows: Rows | PairRows = data.val
        self.val = [data.val] if len(data.val) else []
        if not self.val:
            logger.warning("no validation examples (data.val_fraction=0, no data.val_path)")
        self.data_identity = [_fingerprint(d, t.seed)]

    def _planner_strategy(self) -> dict[str, object]:
        if not self.ft.uses_lora:
            return {}
        kind = "qlora" if self.method == "qlora" else "lora"
        return {"finetune": kind, "lora_rank": self.ft.lora.rank}

    def _flops_per_token(self) -> float:
        """LoRA / QLoRA: the frozen base's backward skips its weight gradients (4·N), the
        adapters train in full (6 per parameter). DPO and full fine-tuning count as pretraining."""
        if self.method not in ("lora", "qlora"):
            return super()._flops_per_token()
        adapters = sum(
            p.numel() for part in self.model.parts for p in part.parameters() if p.requires_grad
        )
        return self.cfg.model.flops_per_token(self.cfg.train.seq_len, frozen=True) + 6 * adapters

    def _save_config(self) -> None:
        files = RunFiles(self.run_dir)
        files.config.write_text(tomli_w.dumps(config_to_dict(self.ft)))
        files.data_report.write_text(json.dumps(self.report.to_dict(), indent=2))

    # -- model --------------------------------------------------------------------------------

    def _build_model(self, mesh: DeviceMesh | None) -> ParallelModel:
        ft, seed = self.ft, self.cfg.train.seed

        def adapt(part: torch.nn.Module) -> None:
            apply_lora(part, ft.lora)

        def init(name: str, tensor: torch.Tensor) -> None:
            init_lora_parameter_(name, tensor, seed)  # base weights: loaded next

        qlora = self.method == "qlora"
        if qlora and self.dims.world_size > 1:
            raise LoomError(
                "finetune.method=qlora runs in one process (NF4 weights are not sharded "
                "yet); launch without --nproc, or use finetune.method=lora"
            )
        base, _ = load_model(self.base_path, torch.float32, Path(self._scratch.name))
        merge_lora(base)  # a LoRA run as the base: its adapters are part of the base now
        weights = base.state_dict()
        # QLoRA: the fp32 copy stays in host memory; only NF4 weights reach the device.
        adapted = adapt if ft.uses_lora else None
        model = self._parallel_copy(mesh, weights, adapted, init, on_host=qlora)
        if self.method == "dpo" and not ft.dpo.lora:
            self.reference = self._parallel_copy(mesh, weights, None, init)
            for part in self.reference.parts:
                part.requires_grad_(False)
        del base, weights
        if qlora:
            count = sum(quantize_base_nf4(part, self.device) for part in model.parts)
            logger.info("QLoRA: %d projections stored as NF4 on %s", count, self.device)
        self._log_parameters(model)
        return model

    def _parallel_copy(
        self,
        mesh: DeviceMesh | None,
        weights: dict[str, torch.Tensor],
        adapt: Any,
        init: Any,
        on_host: bool = False,
    ) -> ParallelModel:
        """The model in this run's layout, holding the base weights (sliced to the shards)."""
        model = parallelize(
            self.cfg, self.dims, mesh, self.device, cross_entropy, adapt, init, on_host
        )
        for part in model.parts:
            for name, param in part.named_parameters():
                name = clean_name(name)
                if ".lora_" not in name:
                    set_whole_parameter(param, name, lambda n, t: t.copy_(weights[n]))
        return model

    def _log_parameters(self, model: ParallelModel) -> None:
        parts = model.parts
        total = self.cfg.model.num_params()
        trainable = sum(p.numel() for part in parts for p in part.parameters() if p.requires_grad)
        base_bytes = sum(base_weight_bytes(part) for part in parts)
        logger.info(
            "%s fine-tuning of %s: %.2fM parameters, %.2fM trainable (%.2f%%); base weights "
            "%.1f MiB (%.2f bytes/parameter)",
            self.method,
            self.base_path,
            total / 1e6,
            trainable / 1e6,
            100 * trainable / total,
            base_bytes / 2**20,
            base_bytes / total,
        )

    def _checkpoint_state(self) -> dict[str, Any]:
        return {
            "finetune": {
                "method": self.method,
                "base": str(self.base_path),
                "lora": asdict(self.ft.lora) if self.ft.uses_lora else None,
            }
        }

    def _check_resume(self, state: dict[str, Any]) -> None:
        saved, current = state.get("finetune"), self._checkpoint_state()["finetune"]
        if saved != current:
            raise LoomError(
                f"run_dir {self.run_dir} holds a fine-tuning checkpoint of {saved}, but the config "
                f"asks for {current}; restore model.path, finetune.method and [lora], or use a "
                "new run_dir"
            )

    # -- steps and evaluation -----------------------------------------------------------------

    def _micro_step(self, batch: list[torch.Tensor], scale: float) -> torch.Tensor | None:
        if self.method != "dpo":
            # The mean over the trained targets of the whole global micro-batch, whatever
            # their split over data-parallel ranks: each rank's mean is weighted by its share.
            assert isinstance(self.loader, RowLoader)
            weight = self.loader.share_trained * self.dims.dp / self.loader.global_trained
            loss = super()._micro_step(batch, scale * weight)
            return None if loss is None else loss * weight
        losses, chosen, rejected = self._dpo(batch)
        loss = losses.mean()
        (loss * scale).backward()
        self._rewards.append(chosen - rejected)
        return loss.detach()

    def _dpo(self, batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        chosen_in, chosen_tg, rejected_in, rejected_tg = batch
        inputs = torch.cat([chosen_in, rejected_in])
        targets = torch.cat([chosen_tg, rejected_tg])
        # One answer per row, padded at the end: the columns after the last scored position
        # change nothing (attention is causal), so they are cut.
        scored = (targets != -100).any(0).nonzero()
        width = int(scored.max()) + 1 if len(scored) else 1
        inputs, targets = inputs[:, :width], targets[:, :width]
        policy = self.model.parts[0]
        reference = self.reference.parts[0] if self.reference is not None else policy
        off: AbstractContextManager[object] = (
            adapters_disabled(policy) if self.reference is None else nullcontext()
        )
        with self.model.autocast:
            with torch.no_grad(), off:
                ref_logps = sequence_logps(reference(inputs), targets)
            logps = sequence_logps(policy(inputs), targets)
        return dpo_loss(logps, ref_logps, self.ft.dpo.beta)

    def _extra_metrics(self) -> dict[str, float]:
        """DPO: the share of pairs whose chosen answer out-rewards the rejected one, and the
        mean reward margin, over the steps since the last record (and on validation)."""
        record: dict[str, float] = {}
        if self._rewards:
            margins = torch.cat(self._rewards)
            self._rewards = []
            stats = torch.stack([(margins > 0).float().mean(), margins.mean()])
            stats = distributed.all_reduce(stats) / self.dims.dp if self.distributed else stats
            record = {"reward_accuracy": stats[0].item(), "reward_margin": stats[1].item()}
        if self._val_rewards is not None:
            record["val_reward_accuracy"], record["val_reward_margin"] = self._val_rewards
            self._val_rewards = None
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """The loss over the whole validation set: token-weighted for SFT, per pair for DPO."""
        rows, dp, rank = self.val_rows, self.dims.dp, self.model.dp_rank
        micro = max(1, (self.cfg.train.micro_batch_size or self.cfg.train.batch_size) // dp)
        for part in self.model.parts:
            part.eval()
        # Every rank runs the same number of forward passes (FSDP gathers weights together);
        # the slots past the end repeat row 0 with weight 0.
        per_rank = -(-len(rows) // dp)
        slots = torch.arange(rank, per_rank * dp, dp)
        totals = torch.zeros(4, device=self.device)  # loss sum, weight, reward hits, margin
        packed = holds_several_examples(rows)
        for start in range(0, len(slots), micro):
            index = slots[start : start + micro]
            real = index < len(rows)
            tensors = [x.to(self.device) for x in row_tensors(rows, index * real, packed)]
            if self.method == "dpo":
                losses, chosen, rejected = self._dpo(tensors)
                weight = real.to(self.device).float()
                margin = (chosen - rejected) * weight
                stats = [(losses * weight).sum(), weight.sum(), (margin > 0).sum(), margin.sum()]
                totals += torch.stack(stats).float()
                continue
            inputs, targets, *doc_ids = tensors
            targets[~real.to(self.device)] = -100
            count = (targets != -100).sum()
            if count == 0:
                self.model.eval_loss(inputs, targets, *doc_ids)  # keep the ranks in step
                continue
            loss = self.model.eval_loss(inputs, targets, *doc_ids)
            assert loss is not None
            totals[0] += loss.float() * count
            totals[1] += count
        if self.distributed:
            totals = distributed.all_reduce(totals)
        if self.method == "dpo":
            self._val_rewards = ((totals[2] / totals[1]).item(), (totals[3] / totals[1]).item())
        return (totals[0] / totals[1]).item()

    # -- output -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        before = self._evaluate_base() if self.step == 0 and self.val else None
        result = super().run()
        if before is not None:
            result.val_losses = {0: before, **result.val_losses}
        if self.ft.uses_lora and result.stopped_by is None:
            self._export_adapter()
        self._scratch.cleanup()
        return result

    def _evaluate_base(self) -> float:
        """The validation loss before any update, recorded as step 0 (what fine-tuning is
        measured against)."""
        loss = self.evaluate()
        record: dict[str, float] = {"step": 0, "val_loss": loss, **self._extra_metrics()}
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            writer = MetricsWriter(self.run_dir, self.cfg.metrics.tensorboard, 0)
            writer.write(record)
            writer.close()
        logger.info("validation loss before fine-tuning: %.4f", loss)
        return loss

    def _export_adapter(self) -> None:
        """`<run_dir>/adapter/`: the full (unsharded) adapter tensors in PEFT's layout."""
        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
        )
        weights = get_model_state_dict(self.model.parts[0], options=options)
        if self.rank == 0:
            folder = save_adapter(
                self.run_dir / "adapter",
                {clean_name(k): v for k, v in weights.items()},
                self.ft.lora,
                str(self.base_path),
            )
            logger.info("adapter written in PEFT's layout: %s", folder)


def _fingerprint(d: Any, seed: int) -> str:
    """The data files' bytes and the settings that decide the rows (a resumed run must get the
    same rows)."""
    digest = hashlib.sha256()
    for path in (d.path, d.val_path):
        if path:
            digest.update(Path(path).read_bytes())
    settings = [d.val_fraction, d.template, d.overlong, d.packing, seed]
    digest.update(json.dumps(settings).encode())
    return f"jsonl:{digest.hexdigest()[:16]}"


def finetune(cfg: FinetuneConfig) -> TrainResult:
    return FinetuneTrainer(cfg).run()
